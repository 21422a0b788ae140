"""Supervised fine-tuning on PyTorch FSDP2, one process per device. Imports no Prefect.

    torchrun --nproc_per_node=2 -m labtune.training.worker --config train_config.json

The config (a WorkerConfig, written by the train stage) names the model directory, the tokenize
stage's training examples (a `datasets` folder of input_ids, labels and length), the output
directory and the hyperparameters (FastChat's names). Each decoder layer is one `fully_shard`
unit, then the root; gloo on CPU, NCCL on GPU. The labels mask everything but the assistant turns.
The final model is gathered to rank 0 with CPU offload and saved as safetensors. Rank 0 alone
prints and writes; other ranks speak only when they fail.

In the order torchtune's recipes read: `setup` (process group, model, sharding, optimizer),
`CheckpointRunner.resume`, `train_step` (one optimizer step over the accumulation window),
`log_step`, `CheckpointRunner.save`, `export`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from labtune.data.chat import IGNORE_INDEX
from labtune.recipe import WSD_DECAY_FRACTION, TrainConfig
from labtune.training import distill, early_stopping, frozen_prefix, packing
from labtune.training.batches import collate, load_examples, micro_batches_per_epoch, rank_batches
from labtune.training.distributed import init_distributed, log
from labtune.training.frozen_prefix import FrozenPrefix
from labtune.training.distill import SoftTargets
from labtune.training.loss import AnswerLoss, predicting_positions
from labtune.training.model import build_model, export_model, param_groups
from labtune.training.saving import CheckpointRunner, writing
from labtune.training.throughput import FlopsModel, describe, mfu, peak_memory_gib, synchronize
from labtune.training.trackers import Trackers, step_metrics
from labtune.training.worker_config import WORKER_ERROR, WorkerConfig, WorkerError


def make_scheduler(optimizer: torch.optim.Optimizer, train_config: TrainConfig, total_updates: int) -> Any:
    """transformers' schedule by its name; warmup_stable_decay decays over the last
    WSD_DECAY_FRACTION of the steps unless lr_scheduler_kwargs names num_decay_steps."""
    from transformers import get_scheduler

    kwargs = dict(train_config.lr_scheduler_kwargs)
    if train_config.lr_scheduler_type == "warmup_stable_decay":
        kwargs.setdefault("num_decay_steps", max(1, math.ceil(WSD_DECAY_FRACTION * total_updates)))
    return get_scheduler(train_config.lr_scheduler_type, optimizer,
                         num_warmup_steps=math.ceil(train_config.warmup_ratio * total_updates),
                         num_training_steps=total_updates, scheduler_specific_kwargs=kwargs)


@dataclass
class Tally:
    """Counts of one rank over some optimizer steps, for throughput and MFU."""

    steps: int = 0
    tokens: int = 0  # non-pad
    computed: int = 0  # padding included
    labels: int = 0  # tokens the loss is computed on
    rows: int = 0  # sequences

    def add(self, other: "Tally") -> None:
        for name in ("steps", "tokens", "computed", "labels", "rows"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summed(self, device: torch.device) -> "Tally":
        """The same counts added over every rank."""
        counts = torch.tensor([self.steps, self.tokens, self.computed, self.labels, self.rows], dtype=torch.float64,
                              device=device)
        dist.all_reduce(counts)
        return Tally(self.steps, *(int(c) for c in counts[1:].tolist()))

    def flops(self, model: FlopsModel) -> float:
        return model.flops(self.tokens, self.labels, self.tokens / max(self.rows, 1))


@dataclass
class Run:
    """Everything `setup` builds for the loop: where it runs, what it trains, how."""

    cfg: WorkerConfig
    rank: int
    world: int
    local_rank: int
    device: torch.device
    tokenizer: Any
    examples: Any
    lengths: list[int]
    pad_id: int
    model: torch.nn.Module
    base_config: Any
    save_dtype: torch.dtype
    lora_config: Any
    sharding: dict[str, Any]
    optimizer: Any
    scheduler: Any
    updates_per_epoch: int
    total_updates: int
    autocast: bool = False  # bf16 autocast around the forward (one CPU process asked for bf16)
    loss: AnswerLoss | None = None
    flops_model: FlopsModel | None = None
    peak: float | None = None  # the device's dense bf16 FLOP/s; None: MFU is not reported
    history: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    total: Tally = field(default_factory=Tally)  # this process's counts since it started
    flops_done: float = 0.0  # training FLOPs of every rank since step 0 (a resumed run continues the count)
    labels_done: int = 0  # label tokens likewise
    dev: Any = None  # early stopping's questions (tokenized), None without eval_strategy
    dev_flops: float = 0.0
    schedule: early_stopping.StoppableSchedule | None = None  # the WSD schedule early stopping can end
    stopping: early_stopping.Stopping | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    prefix: FrozenPrefix | None = None  # the frozen layers' output per example, computed once
    prefix_flops: float = 0.0  # what computing it cost
    dev_prefix: FrozenPrefix | None = None  # the same for the dev questions
    dev_prefix_flops: float = 0.0
    trackers: Trackers | None = None  # rank 0's TensorBoard and MLflow writers (train.report_to)
    soft: SoftTargets | None = None  # replay answers as the base model's distributions (train.replay_distill_top_k)
    soft_flops: float = 0.0  # what computing them cost


def setup(cfg: WorkerConfig) -> Run:
    """Process group and device, the examples, the model (build_model), the optimizer and the
    schedule."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    train_config = cfg.train
    place = init_distributed(cfg.backend, train_config)
    torch.manual_seed(train_config.seed)
    tokenizer = AutoTokenizer.from_pretrained(Path(cfg.model_dir))
    examples, lengths = load_examples(cfg.train_dir)
    if not lengths:
        raise WorkerError(f"{cfg.train_dir}: no training examples")
    log(f"world_size={place.world} backend={place.backend} device={place.device.type} examples={len(lengths)}")
    built = build_model(Path(cfg.model_dir), train_config, place)
    train_config = built.train  # fp32 where the CPU has no native bf16

    bs, gas = train_config.per_device_train_batch_size, train_config.gradient_accumulation_steps
    updates_per_epoch = math.ceil(micro_batches_per_epoch(train_config, lengths, place.world) / gas)
    total_updates = max(1, math.ceil(train_config.num_train_epochs * updates_per_epoch))
    optimizer = torch.optim.AdamW(param_groups(built.model, train_config.weight_decay), lr=train_config.learning_rate,
                                  betas=(0.9, 0.999), eps=1e-8, fused=True)  # one kernel for all updates: 4x faster on CPU too
    schedule = None
    if train_config.eval_strategy != "no" and train_config.lr_scheduler_type == "warmup_stable_decay":
        scheduler, schedule = early_stopping.stoppable_scheduler(optimizer, train_config, total_updates)
    else:
        scheduler = make_scheduler(optimizer, train_config, total_updates)
    rows = f"packed rows of up to {train_config.packing_length} tokens" if train_config.packing else "examples"
    log(f"training: {total_updates} optimizer steps ({updates_per_epoch} per epoch), micro-batch {bs} {rows} x "
        f"accumulation {gas} x world {place.world}, {built.attention} attention, logits on label tokens only"
        + ("; fewer if early stopping ends it (dev questions: train.eval_strategy)" if train_config.eval_strategy != "no" else ""))
    flops = built.flops_model
    log(f"throughput: synchronized wall time at each logged step; FLOPs per token 6 x {flops.trained:,} trained "
        f"+ 4 x {flops.frozen:,} frozen + 2 x {flops.inert:,} frozen below them matmul parameters "
        f"+ 12 x layers x hidden x length (docs/training.md); {describe(built.peak, place.device)}")
    run = Run(cfg=cfg, rank=place.rank, world=place.world,
              local_rank=place.local_rank, device=place.device, tokenizer=tokenizer, examples=examples, lengths=lengths,
              pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
              model=built.model, base_config=built.base_config, save_dtype=built.save_dtype,
              lora_config=built.lora_config, sharding=built.sharding, optimizer=optimizer, scheduler=scheduler,
              updates_per_epoch=updates_per_epoch, total_updates=total_updates, autocast=built.autocast,
              loss=AnswerLoss(built.model), flops_model=flops, peak=built.peak, schedule=schedule)
    if train_config.eval_strategy != "no":
        if not cfg.dev_dir or not Path(cfg.dev_dir).is_dir():
            raise WorkerError("train.eval_strategy: the tokenize stage has no dev questions (data.augment.dev_questions)")
        run.dev = load_examples(cfg.dev_dir)[0]
        run.stopping = early_stopping.Stopping(train_config.early_stopping_patience, train_config.early_stopping_threshold)
    if train_config.cache_frozen_layers and (train_config.freeze_layers or train_config.freeze_embeddings):
        cache_frozen_prefix(run, built.sharded)
    if train_config.replay_distill_top_k:
        distill_replay(run, train_config.replay_distill_top_k)
    return run


def distill_replay(run: Run, top_k: int) -> None:
    """train.replay_distill_top_k: the replay examples' soft targets, from the model before its first step."""
    from datasets import load_from_disk

    indices = distill.replay_indices(list(load_from_disk(run.cfg.train_dir)["id"]))
    if not indices:
        log("train.replay_distill_top_k: no replay examples in the training data (data.replay): nothing to distill")
        return
    started = time.time()

    def label_logits(chunk: list[int]) -> tuple[torch.Tensor, list[int]]:
        cpu_batch = collate([run.examples[i] for i in chunk], run.pad_id)
        if run.prefix is not None:
            cpu_batch["inputs_embeds"] = run.prefix.embeds([[i] for i in chunk], cpu_batch["input_ids"].shape[1])
        batch = {k: v.to(run.device) for k, v in cpu_batch.items()}
        counts = [int(c) for c in predicting_positions(cpu_batch["labels"]).sum(dim=1)]
        skipping = run.prefix.skipping() if run.prefix is not None else contextlib.nullcontext()
        with skipping, torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.autocast):
            return run.loss.label_logits(run.model, batch), counts

    run.soft = distill.soft_targets(run.model, indices, top_k, label_logits)
    tokens = sum(run.lengths[i] for i in indices)
    labels = sum(run.soft.label_counts.values())
    run.soft_flops = run.flops_model.forward_flops(tokens, labels, tokens / len(indices))
    log(f"replay: {len(indices)} answers ({labels:,} tokens) learned as the model's own distribution over its "
        f"{run.soft.top_k} likeliest tokens and the rest, read in {time.time() - started:.1f}s (train.replay_distill_top_k)")


def cache_frozen_prefix(run: Run, sharded: bool) -> None:
    """train.cache_frozen_layers: the frozen layers run once per example (and per dev question),
    here, instead of every step; the FLOP count then charges them once."""
    from labtune.training.throughput import decoder_layers

    layers = decoder_layers(run.model)
    dev_lengths = [len(run.dev[i]["input_ids"]) for i in range(len(run.dev))] if run.dev is not None else []
    tokens, dev_tokens = sum(run.lengths), sum(dev_lengths)
    reason = frozen_prefix.why_not(run.model, layers, sharded, tokens + dev_tokens)
    if reason:
        log(f"frozen layers run every step: {reason}")
        return
    started = time.time()
    run.prefix = FrozenPrefix.build(run.model, layers, run.examples, run.device, run.autocast)
    depth = run.prefix.depth
    run.prefix_flops = run.flops_model.prefix_flops(depth, tokens, tokens / len(run.lengths))
    if run.dev is not None:
        run.dev_prefix = FrozenPrefix.build(run.model, layers, run.dev, run.device, run.autocast)
        run.dev_prefix_flops = run.flops_model.prefix_flops(depth, dev_tokens, dev_tokens / max(len(dev_lengths), 1))
    run.flops_model = run.flops_model.without_prefix(depth)
    kept = run.prefix.nbytes() + (run.dev_prefix.nbytes() if run.dev_prefix else 0)
    log(f"frozen layers 0-{depth - 1} computed once for the {len(run.lengths)} examples"
        f"{f' and {len(dev_lengths)} dev questions' if dev_lengths else ''} in {time.time() - started:.1f}s "
        f"({kept / 2**20:.0f} MiB kept); each step starts at layer {depth} (train.cache_frozen_layers)")


def epoch_batches(run: Run, epoch: int) -> list[Any]:
    """This rank's micro-batches of one epoch (index lists; rows of index lists when packed)."""
    train_config = run.cfg.train
    if train_config.packing:
        steps = math.ceil(run.updates_per_epoch * train_config.gradient_accumulation_steps)
        return packing.rank_rows(run.lengths, epoch, train_config.seed, run.rank, run.world,
                                 train_config.per_device_train_batch_size, int(train_config.packing_length), steps=steps)
    return rank_batches(run.lengths, epoch, train_config.seed, run.rank, run.world,
                        train_config.per_device_train_batch_size)


def make_batch(run: Run, micro: list[Any]) -> dict[str, torch.Tensor]:
    packed = run.cfg.train.packing
    if packed:
        batch = packing.collate_packed([[run.examples[i] for i in row] for row in micro], run.pad_id)
    else:
        batch = collate([run.examples[i] for i in micro], run.pad_id)
    if run.prefix is not None:
        batch["inputs_embeds"] = run.prefix.embeds(micro if packed else [[i] for i in micro], batch["input_ids"].shape[1])
    if run.soft is not None:
        soft = run.soft.batch([i for row in micro for i in row] if packed else list(micro), run.examples)
        if soft is not None:
            batch.update(soft)
    return batch


def train_step(run: Run, window: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, Tally]:
    """One optimizer step over an accumulation window of micro-batches; returns this rank's share
    of the step's loss, the gradient norm, and the window's counts."""
    device, world = run.device, run.world
    # The step's loss is the mean over every label token of every rank and micro-batch, as one
    # process with the whole batch would compute it: each micro-batch sums its token losses
    # and divides by the step's global label count. FSDP averages gradients over ranks, hence
    # the factor world. (A mean of per-micro-batch means would weigh short answers more.)
    local_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
    label_tokens = torch.tensor(float(local_labels), device=device)
    dist.all_reduce(label_tokens)
    loss_sum = torch.zeros((), device=device)
    tally = Tally(steps=1, labels=local_labels)
    for cpu_batch in window:
        batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
        skipping = run.prefix.skipping() if "inputs_embeds" in batch and run.prefix else contextlib.nullcontext()
        with skipping, torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.autocast):
            loss = run.loss(run.model, batch, label_tokens.clamp(min=1))
        (loss * world).backward()
        loss_sum += loss.detach()
        tally.tokens += int(cpu_batch["attention_mask"].sum())
        tally.computed += cpu_batch["attention_mask"].numel()
        tally.rows += int(cpu_batch["segments"]) if "segments" in cpu_batch else cpu_batch["attention_mask"].shape[0]
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.train.max_grad_norm or float("inf"))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, tally


def stopping_state(run: Run) -> dict[str, Any]:
    """What a checkpoint keeps of early stopping and the FLOP count (the best weights are not kept:
    after a resume the best is chosen among the evaluations from there on)."""
    return {"flops_done": run.flops_done, "labels_done": run.labels_done, "dev_flops": run.dev_flops,
            "total_updates": run.total_updates,
            "stopping": run.stopping.state() if run.stopping else None,
            "schedule": vars(run.schedule).copy() if run.schedule else None}


def resume_stopping(run: Run, state: dict[str, Any]) -> None:
    run.flops_done, run.labels_done = state.get("flops_done", 0.0), state.get("labels_done", 0)
    run.dev_flops = state.get("dev_flops", 0.0)
    run.total_updates = state.get("total_updates", run.total_updates)
    if run.stopping and state.get("stopping"):
        run.stopping = early_stopping.Stopping(**state["stopping"])
    if run.schedule and state.get("schedule"):
        vars(run.schedule).update(state["schedule"])


def peak_memory_per_rank(run: Run) -> list[float]:
    gathered = [torch.zeros(1, dtype=torch.float64, device=run.device) for _ in range(run.world)]
    dist.all_gather(gathered, torch.tensor([peak_memory_gib(run.device)], dtype=torch.float64, device=run.device))
    return [round(float(g), 2) for g in gathered]


def log_step(run: Run, epoch: float, loss_sum: torch.Tensor, grad_norm: torch.Tensor, window: Tally,
             elapsed: float) -> None:
    """The step's record (loss over all ranks, learning rate, gradient norm, throughput) into the
    history and onto stdout as a `progress` line the stage reads. `elapsed`: the window's wall
    time, read after the device finished (synchronize)."""
    dist.all_reduce(loss_sum)  # the ranks' shares add up to the step's mean loss
    counts = window.summed(run.device)
    norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    flops = counts.flops(run.flops_model)
    run.flops_done += flops
    run.labels_done += counts.labels
    utilization = mfu(flops, elapsed, run.peak, run.world)
    record = {
        "step": run.step, "total_steps": run.total_updates, "epoch": round(epoch, 3),
        "loss": round(float(loss_sum), 5), "learning_rate": run.scheduler.get_last_lr()[0],
        "grad_norm": round(float(norm), 4), "tokens": counts.tokens, "step_time_s": round(elapsed / max(window.steps, 1), 4),
        "tokens_per_s": round(counts.tokens / max(elapsed, 1e-9), 1),
        "mfu": round(utilization, 4) if utilization is not None else None,
        "peak_memory_gib": peak_memory_per_rank(run),
        "padding_fraction": round(1 - counts.tokens / max(counts.computed, 1), 3),
        # what the steps so far cost and taught: held-out accuracy is plotted against these
        "label_tokens": run.labels_done, "flops": run.flops_done, "sequences": counts.rows,
    }
    run.history.append(record)
    log("progress " + json.dumps(record))
    if run.trackers is not None:
        run.trackers.log(run.step, step_metrics(record))


def export(run: Run, train_seconds: float, epochs_run: int, resumed_from: int | None, checkpoints: list[str]) -> None:
    """The full state dict gathered to rank 0 (on the CPU), saved as a plain transformers model
    with the tokenizer and train_metrics.json."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    totals = run.total.summed(run.device)
    utilization = mfu(totals.flops(run.flops_model), train_seconds, run.peak, run.world)
    peak_memory = peak_memory_per_rank(run)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)  # the export's own peak, below
    # gathered one parameter at a time and moved to host memory at once: the GPU never holds more
    # than the training state plus one full parameter (the seed ran out of memory here)
    state = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # on a CPU the resident set cannot be reset: the export's peak is only reported on a GPU
    export_peak = peak_memory_per_rank(run) if run.device.type == "cuda" else None
    if run.rank == 0:
        out_dir = Path(run.cfg.output_dir)
        with writing(out_dir, sum(t.numel() for t in state.values()) * run.save_dtype.itemsize):
            out_dir.mkdir(parents=True, exist_ok=True)
            export_model(state, run.base_config, run.save_dtype, run.lora_config, out_dir)
            run.tokenizer.save_pretrained(out_dir)
        metrics = {"history": run.history, "sharding": run.sharding, "optimizer_steps": run.step, "epochs_run": epochs_run,
                   "examples": len(run.examples), "train_seconds": round(train_seconds, 2), "world_size": run.world,
                   "resumed_from_step": resumed_from,
                   "useful_tokens": totals.tokens, "computed_tokens": totals.computed, "label_tokens": totals.labels,
                   "useful_tokens_per_s": round(totals.tokens / max(train_seconds, 1e-9), 1),
                   "mfu": round(utilization, 4) if utilization is not None else None,
                   "peak_flops": run.peak, "flops_per_token": "6 x matmul parameters (4 if frozen, 2 if frozen below "
                   "every trained one; output layer on label tokens only) + 12 x layers x hidden x length",
                   "train_flops": run.flops_done, "train_label_tokens": run.labels_done, "dev_flops": run.dev_flops,
                   "early_stopping": run.stopping.state() if run.stopping else None, "peak_memory_gib": peak_memory,
                   "frozen_prefix": {"layers": run.prefix.depth, "flops": run.prefix_flops,
                                     "tokens": sum(run.lengths)} if run.prefix else None,
                   "export_peak_memory_gib": export_peak,
                   "checkpoints": checkpoints,
                   # where the trackers wrote, for the evaluate stage to add its summary to the same run
                   "tracked": {"report_to": run.cfg.train.report_to, "step": run.step,
                               "logging_dir": run.cfg.logging_dir if run.trackers and run.trackers.tensorboard else None,
                               "mlflow_run_id": run.trackers.mlflow_run_id if run.trackers else None}}
        (out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
        log(f"saved final model to {out_dir} after {run.step} steps in {train_seconds:.1f}s")


def run_training(cfg: WorkerConfig) -> None:
    run = setup(cfg)
    train_config = cfg.train
    checkpointing = CheckpointRunner(cfg, run.rank, run.world, run.local_rank)
    resumed = checkpointing.resume(run.model, run.optimizer, run.scheduler)
    if resumed is not None:
        run.step, run.history = resumed["step"], resumed["history"]
        resume_stopping(run, resumed)
        if resumed["world_size"] != run.world:
            log(f"note: the checkpoint was written by {resumed['world_size']} ranks, this run has {run.world}: "
                "the weights and optimizer are resharded; the data order from here differs from the original run's")
    if run.rank == 0 and cfg.train.report_to != ["none"]:
        run.trackers = Trackers(cfg.train.report_to, cfg.logging_dir, cfg.run_name, cfg.run_tags)
    run.flops_done += run.prefix_flops + run.soft_flops  # computed again after a resume: spent again
    run.dev_flops += run.dev_prefix_flops

    run.model.train()
    gas = train_config.gradient_accumulation_steps
    started = time.time()
    window = Tally()
    window_loss = torch.zeros((), device=run.device)
    window_start = time.time()
    epoch = run.step // run.updates_per_epoch
    skip = run.step % run.updates_per_epoch  # optimizer steps of this epoch already done before the checkpoint
    while run.step < run.total_updates:
        batches = epoch_batches(run, epoch)
        for start in range(skip * gas, len(batches), gas):
            if run.step >= run.total_updates:
                break
            micro_batches = [make_batch(run, micro) for micro in batches[start : start + gas]]
            loss_sum, grad_norm, tally = train_step(run, micro_batches)
            run.step += 1
            run.total.add(tally)
            window.add(tally)
            window_loss = loss_sum
            if run.step % train_config.logging_steps == 0 or run.step == run.total_updates:
                synchronize(run.device)  # only at logged steps: nothing per micro-batch
                log_step(run, epoch + (start + len(micro_batches)) / len(batches), window_loss, grad_norm, window,
                         time.time() - window_start)
                window = Tally()
                window_start = time.time()
            if early_stopping.eval_due(train_config, run.step, run.updates_per_epoch, run.total_updates):
                early_stopping.evaluate_dev(run)
            if checkpointing.due(run.step, run.total_updates):
                checkpointing.save(run.step, epoch, run.model, run.optimizer, run.scheduler, run.history,
                                   stopping_state(run))
        epoch += 1
        skip = 0
    if run.best_weights is not None and run.stopping and run.stopping.best_step != run.step:
        early_stopping.restore(run.model, run.best_weights)
        log(f"early stopping: the weights of step {run.stopping.best_step} scored best on the dev questions "
            f"({run.stopping.best:.0%}): exporting those (load_best_model_at_end)")
    checkpointing.finish()
    synchronize(run.device)
    export(run, time.time() - started, epoch, resumed["step"] if resumed else None, checkpointing.committed())
    if run.trackers is not None:
        run.trackers.close()
    dist.barrier()
    dist.destroy_process_group()


def leave(code: int) -> None:
    """Exit without the interpreter's teardown. There, a process group still referenced by the
    device mesh was destroyed with a C++ thread running, and the rank aborted ("terminate called
    without an active exception", SIGABRT): about 1 run in 10 under load, after the model was saved
    or after the rank had reported its error. That was the flaky `make test`."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="train_config.json (a WorkerConfig) written by the train stage")
    args = parser.parse_args()
    rank = os.environ.get("RANK", "0")
    try:
        run_training(WorkerConfig.read(Path(args.config)))
    except WorkerError as exc:
        print(f"{WORKER_ERROR} (rank {rank}): {exc}", flush=True)
        leave(1)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # Exception, and torch.distributed.checkpoint's CheckpointException
        traceback.print_exc()
        first_line = (str(exc).splitlines() or [""])[0]
        print(f"{WORKER_ERROR} (rank {rank}): {type(exc).__name__}: {first_line}", flush=True)
        leave(1)
    leave(0)  # everything is saved and every rank is past the last barrier


if __name__ == "__main__":
    main()
