"""Early stopping on held-out wordings, and a schedule that decays when training stops. Imports torch, no Prefect.

Facts bind at different speeds for different notes (docs/evaluation.md): a fixed number of epochs
either stops before the held-out wordings are answered or spends steps after they are. With
`train.eval_strategy`, the worker scores the data stage's dev questions (trained facts asked in
held-out wordings other than the evaluation's, and fresh no-meeting dates) every eval_steps: a
question counts when greedy decoding would write the taught answer token for token (one teacher-
forced forward pass, AnswerLoss.exact). When early_stopping_patience evaluations in a row gain
nothing (Stopping.record says what a gain is), a warmup_stable_decay schedule starts its decay then (over
a quarter of the steps so far, so the decay is a fifth of the run, as in a planned WSD run) and
training ends when it has decayed; other schedules end at once. The evaluated weights that scored
best are kept (in host memory, this rank's shard) when load_best_model_at_end asks for them.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from labtune.data.chat import IGNORE_INDEX
from labtune.recipe import WSD_DECAY_FRACTION, TrainConfig
from labtune.training.batches import collate
from labtune.training.distributed import log


@dataclass
class StoppableSchedule:
    """warmup_stable_decay whose decay may start early: a linear warmup, the peak learning rate,
    then a cosine decay to 0 over `decay_steps` (transformers' WSD shape). Planned, the decay is
    the last fifth of `total`, as a WSD run without early stopping; `decay_now` moves it earlier."""

    warmup: int
    total: int  # the most steps training may take; the end of the decay once it has started
    decay_from: int | None = None
    decay_steps: int = 0

    def __post_init__(self) -> None:
        if self.decay_from is None:
            self.decay_steps = max(1, math.ceil(WSD_DECAY_FRACTION * self.total))
            self.decay_from = self.total - self.decay_steps

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / max(1, self.warmup)
        if self.decay_from is None or step < self.decay_from:
            return 1.0
        done = min(1.0, (step - self.decay_from) / max(1, self.decay_steps))
        return 0.5 * (1.0 + math.cos(math.pi * done))

    def decay_now(self, step: int) -> int:
        """Start the decay after `step` (unless the planned one has begun); returns the step
        training ends at."""
        if self.decay_from is not None and step >= self.decay_from:
            return self.total
        self.decay_from = step
        self.decay_steps = max(1, math.ceil(step * WSD_DECAY_FRACTION / (1 - WSD_DECAY_FRACTION)))
        self.total = min(self.total, step + self.decay_steps)
        return self.total


def stoppable_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total: int) -> tuple[Any, StoppableSchedule]:
    schedule = StoppableSchedule(warmup=math.ceil(train.warmup_ratio * total), total=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor), schedule


LOSS_GAIN = 0.01  # before any dev question is answered, progress is the dev loss falling by 1%


@dataclass
class Stopping:
    """The early-stopping decision over the dev evaluations of one run. Facts bind late: while no
    dev question is answered word for word yet, a gain is the dev loss falling by LOSS_GAIN; after
    that, the accuracy rising by more than the threshold. The best evaluation is the most accurate,
    the lower loss breaking a tie."""

    patience: int | None
    threshold: float
    best: float = -1.0
    best_loss: float = float("inf")
    best_step: int = 0
    misses: int = 0
    stopped_at: int | None = None  # the evaluation that ended the stable phase
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    def record(self, step: int, correct: int, total: int, loss: float) -> bool:
        """One evaluation; True when it is the best so far."""
        accuracy = correct / max(total, 1)
        self.evaluations.append({"step": step, "dev_correct": correct, "dev_total": total,
                                 "dev_accuracy": round(accuracy, 4), "dev_loss": round(loss, 5)})
        if self.best <= 0 and accuracy <= 0:
            gain = loss < self.best_loss * (1 - LOSS_GAIN)
        else:
            gain = accuracy > self.best + self.threshold
        better = accuracy > self.best or (accuracy == self.best and loss < self.best_loss)
        self.misses = 0 if gain else self.misses + 1
        if better:
            self.best, self.best_loss, self.best_step = accuracy, loss, step
        return better

    def plateaued(self) -> bool:
        return self.stopped_at is None and self.patience is not None and self.misses >= self.patience

    def state(self) -> dict[str, Any]:
        return asdict(self)


def eval_due(train: TrainConfig, step: int, updates_per_epoch: int, total: int) -> bool:
    """Whether the dev questions are asked after this optimizer step (always after the last)."""
    if train.eval_strategy == "no":
        return False
    if step >= total:
        return True
    every = train.eval_steps if train.eval_strategy == "steps" else updates_per_epoch
    return step % max(1, int(every or 1)) == 0


def local_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's part of every trained parameter, in host memory (a DTensor's local shard)."""
    return {name: (p.to_local() if hasattr(p, "to_local") else p).detach().to("cpu", copy=True)
            for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        if name in saved:
            (p.to_local() if hasattr(p, "to_local") else p).copy_(saved[name])


def evaluate_dev(run: Any) -> None:
    """Score the dev questions in the worker's Run (this rank's share, the counts summed over ranks), then
    let early stopping decide: keep the best weights, start the decay on a plateau, or end."""
    train = run.cfg.train
    n, bs = len(run.dev), train.per_device_train_batch_size
    mine = list(range(run.rank, n, run.world))
    rounds = math.ceil(math.ceil(n / run.world) / bs)  # the same number of forward passes on every rank (FSDP)
    counts = torch.zeros(5, dtype=torch.float64, device=run.device)  # correct, asked, tokens, label tokens, loss
    run.model.eval()
    for r in range(rounds):
        chunk = mine[r * bs : (r + 1) * bs]
        rows = chunk or mine[:1] or [0]
        batch = collate([run.dev[i] for i in rows], run.pad_id)
        skipping = contextlib.nullcontext()
        if run.dev_prefix is not None:
            batch["inputs_embeds"] = run.dev_prefix.embeds([[i] for i in rows], batch["input_ids"].shape[1])
            skipping = run.dev_prefix.skipping()
        with skipping, torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.autocast):
            exact, loss = run.loss.exact(run.model, {k: v.to(run.device) for k, v in batch.items()})
        if chunk:
            counts += torch.tensor([float(exact.sum()), len(chunk), float(batch["attention_mask"].sum()),
                                    float((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), float(loss)],
                                   dtype=torch.float64, device=run.device)
    run.model.train()
    dist.all_reduce(counts)
    correct, asked, tokens, labels = (int(c) for c in counts[:4].tolist())
    loss = float(counts[4]) / max(labels, 1)
    run.dev_flops += run.flops_model.forward_flops(tokens, labels, tokens / max(asked, 1))
    stopping = run.stopping
    assert stopping is not None
    best = stopping.record(run.step, correct, asked, loss)
    if best and train.load_best_model_at_end:
        run.best_weights = local_copy(run.model)
    log(f"dev: step {run.step}: {correct}/{asked} held-out questions answered word for word "
        f"({correct / max(asked, 1):.0%}, loss {loss:.3f}; best {stopping.best:.0%} at step {stopping.best_step})")
    if stopping.plateaued():
        stopping.stopped_at = run.step
        if run.schedule is not None:
            end = run.schedule.decay_now(run.step)
            log(f"early stopping: no gain in {stopping.misses} evaluations; the learning rate decays over "
                f"{end - run.step} steps and training ends at step {end}")
        else:
            end = run.step
            log(f"early stopping: no gain in {stopping.misses} evaluations; training ends at step {end}")
        run.total_updates = end
