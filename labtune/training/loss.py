"""The training loss, computed only where there is something to learn. Imports only torch.

A chat example's labels mask the system and user turns, so most positions carry no loss; the
output layer (hidden x vocabulary) is still the largest matmul of a small model. `AnswerLoss`
puts a pre-hook on the model's output embeddings that keeps only the hidden states whose next
token is a label, so the logits, their softmax and the output layer's backward cover the answer
tokens alone.

When those logits would still be large (more than LOGITS_PER_CHUNK elements in fp32: long
answers, pretraining-style data, a 128K vocabulary), they are never materialised whole: a forward
hook on the output layer computes the cross-entropy chunk by chunk, each chunk under activation
checkpointing, so at most one chunk of logits exists at a time, forward or backward; the output
layer itself then sees no rows. This runs inside the model's own forward, where FSDP2 has the
output layer's weight gathered, and the loss leaves through the model's output, so FSDP2's
backward hooks fire as for plain logits.

Either way the loss is transformers' causal-LM loss (cross-entropy in fp32, summed over label
tokens, divided by the step's label count): tests/test_loss.py holds both paths to 1e-5 with
their gradients.

A batch may carry soft targets for some of its label tokens (train.replay_distill_top_k,
labtune/training/distill.py): there the token's loss is the KL divergence from the base model's
distribution (its k likeliest tokens and one bucket for the rest) to the model's, not the
cross-entropy of the token written.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from labtune.data.chat import IGNORE_INDEX

LOGITS_PER_CHUNK = 1 << 24  # 64 MiB of fp32 logits: 341 rows of Llama 3's 128,256-token vocabulary


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """Where the model's output is scored: position t predicts the label at t + 1."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def soft_keys() -> tuple[str, str, str]:
    """A batch's soft targets, one row per label token (in the order `predicting_positions` keeps them):
    the base model's k likeliest token ids, their log-probabilities plus the rest's (k + 1 columns),
    and which rows use them."""
    return ("soft_ids", "soft_logprobs", "soft_rows")


class _MixedLoss(torch.autograd.Function):
    """Summed cross-entropy on hard rows and KL(base || model) on soft rows, with the gradient written
    out: softmax(z) minus the target distribution, where a soft row's target is the base's top-k
    probabilities and, on every other token, the model's own tail scaled to the base's rest mass.
    Autograd through log-softmax, gathers and boolean row selection made a dozen passes over the
    (rows x vocabulary) logits, a third of the demo's step on a CPU; this makes three."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, soft_ids: torch.Tensor,
                soft_logprobs: torch.Tensor, soft_rows: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(-1)
        top = probs.gather(1, soft_ids).clamp(min=1e-30)
        # the rest's mass: 1 minus the top, except where the top holds nearly all of it; there 1 - top is fp32 noise
        # (often 0) and the tail's gradient, q_v (1 - p_rest / q_rest), came out at 1e13-1e17: it is summed instead
        rest = 1 - top.sum(-1)
        thin = (soft_rows & (rest < 1e-4)).nonzero().squeeze(1)
        if thin.numel():
            rest[thin] = probs[thin].scatter(1, soft_ids[thin], 0.0).sum(-1)
        rest = rest.clamp(min=1e-30)
        teacher = soft_logprobs.float()
        kl = (teacher.exp() * (teacher - torch.cat([top, rest[:, None]], dim=1).log())).sum(-1)
        hard = -probs.gather(1, targets[:, None]).squeeze(1).clamp(min=1e-30).log()
        ctx.save_for_backward(probs, targets, soft_ids, teacher, soft_rows, rest)
        ctx.dtype = logits.dtype
        return torch.where(soft_rows, kl, hard).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        probs, targets, soft_ids, teacher, soft_rows, rest = ctx.saved_tensors
        out = probs  # saved for this alone: written in place
        soft = soft_rows.nonzero().squeeze(1)
        hard = (~soft_rows).nonzero().squeeze(1)
        if soft.numel():
            scale = 1 - teacher[soft, -1].exp() / rest[soft]  # tail: q_v (1 - p_rest / q_rest)
            top = out[soft].gather(1, soft_ids[soft]) - teacher[soft, :-1].exp()
            out[soft] = out[soft] * scale[:, None]
            out[soft[:, None], soft_ids[soft]] = top
        if hard.numel():
            out[hard, targets[hard]] -= 1
        return (out.mul_(grad)).to(ctx.dtype), None, None, None, None


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, soft_ids: torch.Tensor | None = None,
                   soft_logprobs: torch.Tensor | None = None, soft_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Summed loss of label-token logits: cross-entropy of the target, or on soft rows KL(base || model)
    over the base's k likeliest tokens and the rest of the vocabulary as one bucket."""
    if soft_ids is None:
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    return _MixedLoss.apply(logits, targets, soft_ids, soft_logprobs, soft_rows)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                *soft: torch.Tensor | None) -> torch.Tensor:
    return token_loss_sum(F.linear(hidden, weight, bias), targets, *soft)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model is called with: a packed batch (labtune/training/packing.py) passes its position ids
    and no attention mask (nor a cache), so transformers masks each example off from the others. A
    batch with `inputs_embeds` starts past the frozen layers (labtune/training/frozen_prefix.py)."""
    start = {"inputs_embeds": batch["inputs_embeds"]} if "inputs_embeds" in batch else {"input_ids": batch["input_ids"]}
    if "position_ids" in batch:
        return {**start, "position_ids": batch["position_ids"], "use_cache": False}
    return {**start, "attention_mask": batch["attention_mask"]}


class AnswerLoss:
    """Installed once on a causal LM (plain, PEFT-wrapped or FSDP2-sharded: parameter names and
    sharding are untouched, only the output layer's input and output are replaced while a loss is
    computed). `chunk_rows`: label tokens per chunk; by default LOGITS_PER_CHUNK / vocabulary."""

    def __init__(self, model: torch.nn.Module, chunk_rows: int | None = None):
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings to compute a loss on")
        self.chunk_rows = chunk_rows or max(1, LOGITS_PER_CHUNK // head.weight.shape[0])
        self._keep: torch.Tensor | None = None
        self._targets: torch.Tensor | None = None
        self._soft: tuple[torch.Tensor | None, ...] = ()
        self._hidden: torch.Tensor | None = None
        self._handles = [head.register_forward_pre_hook(self._narrow), head.register_forward_hook(self._chunked)]

    def _narrow(self, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self._keep is None:
            return None
        hidden = args[0][self._keep]
        if hidden.shape[0] <= self.chunk_rows:
            return (hidden, *args[1:])
        self._hidden = hidden
        return (hidden[:0], *args[1:])  # the forward hook computes the loss in chunks instead

    def _chunked(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if self._hidden is None:
            return None
        hidden, self._hidden = self._hidden, None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], self.chunk_rows):
            rows = slice(start, start + self.chunk_rows)
            soft = tuple(t[rows] for t in self._soft)
            total = total + checkpoint(_chunk_loss, hidden[rows], module.weight, module.bias, self._targets[rows],
                                       *soft, use_reentrant=False)
        return total

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], num_items: torch.Tensor | float) -> torch.Tensor:
        """Summed token cross-entropy over the batch's label tokens, divided by num_items (the
        step's label count over every micro-batch and rank)."""
        labels = batch["labels"]
        targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
        soft = tuple(batch[key] for key in soft_keys()) if soft_keys()[0] in batch else ()
        self._keep, self._targets, self._soft = predicting_positions(labels), targets, soft
        try:
            out = model(**model_inputs(batch)).logits
        finally:
            self._keep = self._targets = self._hidden = None
            self._soft = ()
        if out.dim() == 0:  # the chunked path: already the summed loss
            return out / num_items
        return token_loss_sum(out, targets, *soft) / num_items

    @torch.no_grad()
    def label_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logits at the label positions of a batch, one row per label token; the output layer
        sees only those rows."""
        labels = batch["labels"]
        keep = predicting_positions(labels)
        chunk_rows, self.chunk_rows = self.chunk_rows, max(self.chunk_rows, int(keep.sum()))  # the logits themselves
        self._keep, self._targets = keep, labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
        try:
            return model(**model_inputs(batch)).logits
        finally:
            self._keep = self._targets = self._hidden = None
            self.chunk_rows = chunk_rows

    @torch.no_grad()
    def exact(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, whether greedy decoding would write its answer token for token: every label is
        the argmax given the labels before it (teacher forcing, one forward pass); and the summed
        cross-entropy of the labels."""
        labels = batch["labels"]
        keep = predicting_positions(labels)
        targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
        logits = self.label_logits(model, batch)
        wrong = (logits.argmax(-1) != targets).to(torch.int32)
        rows = keep.nonzero()[:, 0]
        misses = torch.zeros(labels.shape[0], dtype=torch.int32, device=labels.device).index_add_(0, rows, wrong)
        return (misses == 0) & keep.any(dim=1), F.cross_entropy(logits.float(), targets, reduction="sum")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
