"""Experiment trackers, by `train.report_to` (Hugging Face's name and values): TensorBoard event
files and MLflow runs. Rank 0 writes loss, learning rate, gradient norm, tokens/s and peak memory at
every logged step; the evaluate stage adds the evaluation summary to the same run. Every run is
tagged with the recipe and, when Prefect started it, the flow-run id. `none` (the default) writes
nothing and imports neither package.

    TensorBoard: event files under `train.logging_dir` (default ~/.labtune/tensorboard/RECIPE/KEY);
                 `tensorboard --logdir ~/.labtune/tensorboard`
    MLflow:      the tracking URI in MLFLOW_TRACKING_URI (a server, or sqlite:///...), else
                 sqlite:///~/.labtune/mlflow.db; the experiment in MLFLOW_EXPERIMENT_NAME, else "labtune"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from labtune.training.worker_config import WorkerError

STEP_METRICS = ("loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu")


def mlflow_uri() -> str:
    from labtune.store.backends import labtune_home

    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{labtune_home() / 'mlflow.db'}"


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise WorkerError("train.report_to: mlflow needs the mlflow package (pip install mlflow)") from None
    mlflow.set_tracking_uri(mlflow_uri())
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "labtune"))
    return mlflow


def _tensorboard(logging_dir: str) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise WorkerError("train.report_to: tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(log_dir=logging_dir)


class Trackers:
    """The trackers one process writes to; opened on rank 0 only."""

    def __init__(self, report_to: list[str], logging_dir: str | None, run_name: str, tags: dict[str, str],
                 mlflow_run_id: str | None = None):
        self.tensorboard = _tensorboard(logging_dir) if "tensorboard" in report_to and logging_dir else None
        self.mlflow, self.mlflow_run_id = None, None
        if "mlflow" in report_to:
            self.mlflow = _mlflow()
            run = self.mlflow.start_run(run_id=mlflow_run_id, run_name=None if mlflow_run_id else run_name, tags=tags)
            self.mlflow_run_id = run.info.run_id

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def step_metrics(record: dict[str, Any]) -> dict[str, float | None]:
    """A logged step's record as tracker metrics (peak memory: the largest rank's, in GiB)."""
    metrics = {key: record.get(key) for key in STEP_METRICS}
    memory = record.get("peak_memory_gib")
    metrics["peak_memory_gib"] = max(memory) if memory else None
    return metrics


def evaluation_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The evaluation summary as metrics: accuracy overall and per tag, for every column."""
    metrics = {}
    for column, accuracy in summary.get("accuracy", {}).items():
        if accuracy["overall"].get("accuracy") is not None:
            metrics[f"eval/{column}/all"] = accuracy["overall"]["accuracy"]
        for tag, tally in accuracy["by_tag"].items():
            if tally.get("accuracy") is not None:
                metrics[f"eval/{column}/{tag}"] = tally["accuracy"]
    return metrics


def log_evaluation(report_to: list[str], tracked: dict[str, Any], summary: dict[str, Any]) -> None:
    """The evaluate stage's summary into the training run's trackers (`tracked`: what the worker
    wrote in train_metrics.json: the TensorBoard folder and the MLflow run id)."""
    if not tracked or report_to == ["none"]:
        return
    trackers = Trackers(report_to, tracked.get("logging_dir") if Path(tracked.get("logging_dir") or "").is_dir() else None,
                        "", {}, tracked.get("mlflow_run_id"))
    trackers.log(tracked.get("step", 0), evaluation_metrics(summary))
    trackers.close()
