"""What the train stage and the torchrun worker agree on, importable without torch or Prefect.

The stage writes a WorkerConfig as train_config.json; every rank reads it back. Each field is
declared once, here or in the recipe's TrainConfig (FastChat's hyperparameter names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from labtune.errors import LabtuneError
from labtune.recipe import TrainConfig
from labtune.store.backends import StoreSettings

# A worker that fails prints one line starting with this, so the stage can report the cause
# rather than torchrun's own ChildFailedError banner.
WORKER_ERROR = "labtune worker error"


class WorkerError(LabtuneError):
    """A problem a person can act on (a setting, the data, the model, a full disk, a missing
    tracker package): the worker prints it as one `WORKER_ERROR` line, which the train stage raises
    as its one-line TrainError; raised in the stage's own process (the evaluate stage's trackers),
    it is that stage's one line."""

# glibc's malloc hands every large tensor back to the kernel when it is freed, so the next step's
# tensors of the same sizes fault their pages in again (autocast's bf16 weight copies, fresh
# gradients). Keeping freed memory in the process instead took a demo step on 2 CPU cores from
# 0.52 s to 0.46 s (docs/training.md). The worker's environment gets these unless already set.
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
                   "MALLOC_TOP_PAD_": str(1 << 30)}


class WorkerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: str  # the model to fine-tune (a fetched weights or delta output)
    train_dir: str  # the tokenize stage's `train/` datasets folder
    dev_dir: str | None = None  # its `dev/` folder: early stopping's questions (train.eval_strategy)
    output_dir: str  # where rank 0 exports the fine-tuned model
    checkpoint_dir: str  # node-local scratch for checkpoints before they are uploaded
    store: StoreSettings  # where checkpoints are uploaded and resumed from
    checkpoint_prefix: str | None = None  # None: this run keeps no checkpoints
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    train: TrainConfig  # the recipe's hyperparameters (accumulation fitted to the data)
    logging_dir: str | None = None  # TensorBoard's folder (train.report_to)
    run_name: str = "labtune"  # the tracker run's name and tags: the recipe, the stage key, the Prefect flow run
    run_tags: dict[str, str] = {}

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2))

    @classmethod
    def read(cls, path: Path) -> "WorkerConfig":
        return cls.model_validate_json(path.read_text())

    @property
    def checkpoints_enabled(self) -> bool:
        return self.train.save_strategy == "steps" and bool(self.checkpoint_prefix)
