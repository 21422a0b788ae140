"""The models room: where weights come from and how they are turned into a Hugging Face folder.

- `sources`: model sources (folder, hf://, s3://, pypi://, GGUF) and their identities;
- `tensorfiles`: checkpoints read and written one tensor at a time;
- `merge`: Vicuna-style deltas and LoRA adapters applied tensor by tensor;
- `meta_llama`: Meta's original `consolidated.*.pth` checkpoints converted;
- `gguf_export`: a model as one GGUF file for llama.cpp and Ollama; `card`: the model card;
- `tiny`: a tiny random LLaMA for tests and the embedded default.

May import: labtune.errors, labtune.recipe, labtune.store, labtune.data (the chat template, for GGUF export).
"""
