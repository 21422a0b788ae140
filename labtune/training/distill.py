"""Replay answers learned as a distribution (train.replay_distill_top_k): soft targets from the model
as it was before training. Imports only torch and labtune.data.

Cross-entropy on a replay answer teaches the one token the base model wrote. Nine epochs of that
made the demo's model twice as sure of itself on any text: its mean entropy on Alpaca's reference
answers fell from 1.70 to 0.80 nats while its top-1 accuracy there barely moved (0.56 -> 0.52), and
its perplexity on them rose 3.7x (docs/evaluation.md). Here, before the first step, the model (LoRA
adapters still zero, or the full weights untouched) reads every replay example once; at each
answer token its k likeliest next tokens and their log-probabilities are kept, with the rest of
the vocabulary as one more bucket. Training then matches those k + 1 probabilities (KL divergence,
labtune/training/loss.py) instead of the written token, so the fine-tune keeps the base model's
uncertainty where it should have it.

Every rank reads the same examples in the same order, so a sharded model's collectives line up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from labtune.data.chat import IGNORE_INDEX
from labtune.data.conversations import REPLAY_PREFIX


def replay_indices(record_ids: list[str]) -> list[int]:
    """The examples the replay stage made (their ids start with REPLAY_PREFIX)."""
    return [i for i, record_id in enumerate(record_ids) if record_id.startswith(REPLAY_PREFIX)]


def label_count(labels: Any) -> int:
    """Label tokens of one example that a position predicts (the first token is never predicted)."""
    labels = torch.as_tensor(labels)
    return int((labels[1:] != IGNORE_INDEX).sum())


@dataclass
class SoftTargets:
    """Per example index: (ids [n, k], log-probabilities [n, k + 1]) for its n label tokens."""

    top_k: int
    targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    label_counts: dict[int, int] = field(default_factory=dict)

    def batch(self, order: list[int], examples: Any) -> dict[str, torch.Tensor] | None:
        """The soft-target tensors of a micro-batch whose examples lie in `order` (row by row, in
        each row left to right); None when none of them has soft targets."""
        if not any(i in self.targets for i in order):
            return None
        ids, logprobs, rows = [], [], []
        for i in order:
            if i in self.targets:
                top, lp = self.targets[i]
                ids.append(top)
                logprobs.append(lp)
                rows.append(torch.ones(top.shape[0], dtype=torch.bool))
            else:
                n = self.label_counts.setdefault(i, label_count(examples[i]["labels"]))
                ids.append(torch.zeros((n, self.top_k), dtype=torch.long))
                logprobs.append(torch.zeros((n, self.top_k + 1), dtype=torch.float32))
                rows.append(torch.zeros(n, dtype=torch.bool))
        return {"soft_ids": torch.cat(ids), "soft_logprobs": torch.cat(logprobs), "soft_rows": torch.cat(rows)}


@torch.no_grad()
def soft_targets(model: torch.nn.Module, indices: list[int], top_k: int,
                 label_logits: Callable[[list[int]], tuple[torch.Tensor, list[int]]], batch_size: int = 8) -> SoftTargets:
    """Soft targets for the examples at `indices`: `label_logits(chunk)` runs the model on a chunk
    of example indices and returns the logits at their label tokens and each example's count."""
    was_training = model.training
    model.eval()  # no dropout in the teacher
    out = SoftTargets(top_k)
    try:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            logits, counts = label_logits(chunk)
            logprobs = logits.float().log_softmax(-1)
            # a small vocabulary (a test model's): leave at least one token for the rest's bucket
            out.top_k = top_k = min(out.top_k, logprobs.shape[-1] - 1)
            top, top_ids = logprobs.topk(top_k, dim=-1)
            rest = logprobs.scatter(1, top_ids, float("-inf")).logsumexp(-1, keepdim=True)
            columns = torch.cat([top, rest], dim=1).cpu()
            for i, part_ids, part in zip(chunk, top_ids.cpu().split(counts), columns.split(counts)):
                out.targets[i] = (part_ids.long(), part)
                out.label_counts[i] = part.shape[0]
    finally:
        model.train(was_training)
    return out
