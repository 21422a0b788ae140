"""The training loss, computed only where there is something to learn. Imports only torch.

A chat example's labels mask the system and user turns, so most positions carry no loss; the
output layer (hidden x vocabulary) is still the largest matmul of a small model. `AnswerLoss`
puts a pre-hook on the model's output embeddings that keeps only the hidden states whose next
token is a label, so the logits, their softmax and the output layer's backward cover the answer
tokens alone. The loss is the same as transformers' causal-LM loss (cross-entropy in fp32, summed
over label tokens, divided by the step's label count): tests/test_loss.py holds it to 1e-5 with
its gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from labtune.chat import IGNORE_INDEX


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """Where the model's output is scored: position t predicts the label at t + 1."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


class AnswerLoss:
    """Installed once on a causal LM (plain, PEFT-wrapped or FSDP2-sharded: parameter names and
    sharding are untouched, only the output layer's input is narrowed while a loss is computed)."""

    def __init__(self, model: torch.nn.Module):
        self._keep: torch.Tensor | None = None
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings to compute a loss on")
        self._handle = head.register_forward_pre_hook(self._narrow)

    def _narrow(self, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self._keep is None:
            return None
        return (args[0][self._keep], *args[1:])

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], num_items: torch.Tensor | float) -> torch.Tensor:
        """Summed token cross-entropy over the batch's label tokens, divided by num_items (the
        step's label count over every micro-batch and rank)."""
        labels = batch["labels"]
        self._keep = predicting_positions(labels)
        try:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            self._keep = None
        targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
        return F.cross_entropy(logits.float(), targets, reduction="sum") / num_items

    def remove(self) -> None:
        self._handle.remove()
