"""Stage 5, train: torchrun + FSDP2 fine-tuning, every rank's output streamed line by line.

The stage fits the accumulation and the memory to the data, writes the worker's config, launches
`torchrun --nproc_per_node=N -m labtune.training.worker` (labtune/training/launch.py: each output
line to the log, the Prefect task log when run as a task; one error line if it fails), and commits
the trained model (safetensors, config, tokenizer, train_metrics.json, the loss plot, the model
card) to the store.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labtune.console import with_estimate
from labtune.models.card import base_license, model_card
from labtune.plots import plot_loss
from labtune.recipe import Recipe, TrainConfig
from labtune.store.backends import Store, StoreError, labtune_home
from labtune.store.outputs import (
    CommittedElsewhere,
    Log,
    StageKey,
    StageResult,
    checkpoint_prefix,
    code_version,
    default_log,
    fetch,
    read_manifest,
    run_stage,
    stage_key,
)
from labtune.training.launch import TrainCrashed, TrainError, run_torchrun, torchrun_command, train_env
from labtune.training.worker_config import WorkerConfig

__all__ = ["TrainCrashed", "TrainError", "build_train", "fitting_accumulation", "train_key"]

# what the worker runs, for the train stage's code hash: a change to any of them is a new model
WORKER_MODULES = ("labtune.training.worker", "labtune.training.worker_config", "labtune.training.loss",
                  "labtune.training.packing", "labtune.training.frozen_prefix", "labtune.training.early_stopping",
                  "labtune.training.distill")


def fitting_accumulation(recipe: Recipe, examples: int, log: Log) -> int:
    """gradient_accumulation_steps for this data: the recipe's, when one optimizer step's worth of
    examples exists (the seed's "size of tensor a must match" failure came from an epoch shorter
    than one accumulation window), else lowered when the recipe allows it, else an error."""
    world, batch = recipe.parallel.world_size, recipe.train.per_device_train_batch_size
    steps = recipe.train.gradient_accumulation_steps
    need = world * batch * steps
    if examples >= need:
        return steps
    ranks = f"parallel.nproc_per_node {world}" if recipe.parallel.nnodes == 1 else \
        f"parallel.nnodes {recipe.parallel.nnodes} x parallel.nproc_per_node {recipe.parallel.processes}"
    numbers = (f"{examples} training examples are fewer than one optimizer step takes: {ranks} "
               f"x train.per_device_train_batch_size {batch} x train.gradient_accumulation_steps {steps} = {need}")
    fitting = examples // (world * batch)
    if not recipe.train.allow_lower_accumulation or fitting < 1:
        hint = "lower per_device_train_batch_size or nproc_per_node" if fitting < 1 else \
            "set train.allow_lower_accumulation: true, or lower those numbers"
        raise TrainError(f"{numbers}; add data or {hint}")
    log(f"train: {numbers}; gradient_accumulation_steps lowered to {fitting} (train.allow_lower_accumulation)")
    return fitting


def fit_memory(recipe: Recipe, train_config: TrainConfig, model_dir: Path, tokens_dir: Path, log: Log) -> tuple[TrainConfig, dict]:
    """The pre-flight memory check (labtune/training/memory.py): `train_config` with gradient_checkpointing
    resolved, and the estimate; TrainError with the numbers and what would fit when nothing does."""
    import torch

    from labtune.training import memory

    use_cuda = recipe.parallel.backend != "gloo" and torch.cuda.is_available()
    parallel = recipe.parallel
    dev = memory.devices(use_cuda, parallel.processes, parallel.memory_per_rank_gib)
    shape = memory.Shape.of_model_dir(model_dir, train_config)
    length, labels = memory.data_limits(tokens_dir)
    if train_config.packing:  # a packed row is as long as packing_length and may be all answers
        length = labels = max(length, int(train_config.packing_length or length))
    try:
        resolved, est = memory.plan(train_config, parallel.world_size, parallel.processes, shape,
                                    lambda rows: memory.Batch(rows, length, rows * labels), dev)
    except memory.DoesNotFit as exc:
        raise TrainError(str(exc)) from None
    available = f"{dev.per_rank / memory.GIB:.1f} GiB per rank ({dev.name.rstrip(',')})"
    chosen = f"; gradient_checkpointing auto -> {resolved.gradient_checkpointing!r}" \
        if train_config.gradient_checkpointing == "auto" else ""
    peak = memory.peak_cpu_rank(est) if dev.kind == "cpu" else est.device
    log(f"memory: ~{peak / memory.GIB:.1f} GiB per rank estimated, training {est.describe()}, of {available}{chosen}")
    return resolved, {"estimate_gib": round(peak / memory.GIB, 2), "parts_gib": est.gib(),
                      "available_gib": round(dev.per_rank / memory.GIB, 2), "device": dev.name,
                      "gradient_checkpointing": resolved.gradient_checkpointing}


def train_key(recipe: Recipe, store: Store, target_uri: str, tokens_uri: str) -> StageKey:
    """Its output is `train/<key>`, its checkpoints `checkpoints/<key>`."""
    # Where this node sits and how it finds the others is not part of the run's identity: every
    # node must compute the same key (its rendezvous id, its checkpoints) and a re-run with another
    # endpoint still resumes.
    placement = {"node_rank", "rdzv_endpoint", "rdzv_timeout", "memory_per_rank_gib"}
    parameters = {"train": recipe.train.model_dump(mode="json", exclude={"report_to", "logging_dir"}),
                  "parallel": recipe.parallel.model_dump(mode="json", exclude=placement)}
    code = code_version(__name__, "labtune.models.card", *WORKER_MODULES)
    inputs = {"target": target_uri, "tokens": tokens_uri}
    return StageKey(stage_key("train", code, inputs, parameters), inputs, parameters)


def build_train(recipe: Recipe, store: Store, target_uri: str, tokens_uri: str, log: Log = default_log,
                on_progress: Callable[[dict], None] | None = None,
                on_checkpoint: Callable[[dict], None] | None = None, run_tags: dict[str, str] | None = None) -> StageResult:
    """Fine-tune the target model on the tokenize stage's output; run_tags go to
    the experiment trackers (the Prefect flow-run id, when Prefect runs it)."""
    stage = train_key(recipe, store, target_uri, tokens_uri)
    key = stage.key

    def build(out: Path) -> dict[str, Any]:
        tokens_dir = fetch(store, tokens_uri, log)
        examples = json.loads((tokens_dir / "report.json").read_text())["train"]["examples"]
        accumulation = fitting_accumulation(recipe, examples, log)
        target_dir = fetch(store, target_uri, log)
        resolved = {"gradient_accumulation_steps": accumulation,
                    "packing_length": recipe.train.packing_length or recipe.data.model_max_length}
        train_config, memory_plan = fit_memory(recipe, recipe.train.model_copy(update=resolved), target_dir, tokens_dir, log)
        config_path = out.parent / "train_config.json"
        dev_dir = tokens_dir / "dev"
        WorkerConfig(model_dir=str(target_dir), train_dir=str(tokens_dir / "train"), output_dir=str(out),
                     dev_dir=str(dev_dir) if dev_dir.is_dir() else None,
                     checkpoint_dir=str(out.parent / "checkpoints"), checkpoint_prefix=checkpoint_prefix(key),
                     # the store this stage writes to (a test may pass its own), reached as the recipe says
                     store=recipe.store.settings().at(store.uri), backend=recipe.parallel.backend,
                     train=train_config, logging_dir=recipe.train.logging_dir or str(labtune_home() / "tensorboard" / recipe.name / key),
                     run_name=f"{recipe.name}-{key[:8]}",
                     run_tags={"recipe": recipe.name, "train_key": key, **(run_tags or {})}).write(config_path)
        nproc = recipe.parallel.processes
        command = torchrun_command(recipe.parallel, config_path, key)
        log("launching: " + " ".join(command[1:]))
        run_torchrun(command, train_env(nproc), log, with_estimate(on_progress, log), on_checkpoint)
        if not (out / "train_metrics.json").is_file() and recipe.parallel.nnodes > 1:
            raise CommittedElsewhere("rank 0 ran on another node; that node's stage commits the model")
        metrics = json.loads((out / "train_metrics.json").read_text())
        plot_loss(metrics["history"], out / "loss.png", title=f"{recipe.name}: training loss",
                  dev=(metrics.get("early_stopping") or {}).get("evaluations"))
        write_model_card(out, recipe, store, target_dir, tokens_uri, stage.parameters, metrics)
        return {"metrics": {k: metrics.get(k) for k in ("optimizer_steps", "examples", "train_seconds", "world_size",
                                                        "resumed_from_step", "checkpoints", "train_flops",
                                                        "train_label_tokens", "dev_flops")},
                "early_stopping": metrics.get("early_stopping"),
                "memory": {**memory_plan, "measured_peak_gib": metrics.get("peak_memory_gib")},
                "final_loss": metrics["history"][-1]["loss"] if metrics["history"] else None}

    nodes = recipe.parallel.nnodes
    return run_stage(store, "train", key, build, inputs=stage.inputs, parameters=stage.parameters, log=log,
                     work_name=f"train-{key}-node{recipe.parallel.node_rank}" if nodes > 1 else None)


def write_model_card(out: Path, recipe: Recipe, store: Store, base_dir: Path, tokens_uri: str,
                     parameters: dict[str, Any], metrics: dict[str, Any]) -> None:
    """README.md in the model folder: base, data (the tokenize and data stages' reports), training.
    The evaluation comes later: the evaluate stage's table goes into an export's card."""
    tokens = read_manifest(store, store.key_for(tokens_uri)) or {}
    data_uri = (tokens.get("inputs") or {}).get("data")
    try:  # the data stage's report, where its output is in this store (a copied or moved store may lack it)
        data = (read_manifest(store, store.key_for(data_uri)) or {}) if data_uri else {}
    except StoreError:
        data = {}
    (out / "README.md").write_text(model_card(recipe.name, recipe.base_model.source, base_license(base_dir),
                                              recipe.model_dump(mode="json"), parameters, metrics,
                                              data.get("report"), tokens.get("report")))
