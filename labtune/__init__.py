"""labtune: fine-tune LLaMA-family chat models on a lab's own notes, orchestrated by Prefect."""

__version__ = "0.1.0"
