"""Packing: several short examples in one row, each attending only to itself. Imports only torch.

A demo example is about 55 tokens; a row of 512 holds eight or nine. Each example keeps its own
position ids (0, 1, 2, ... restarting where it starts) and the row is passed without an attention
mask: transformers then builds a block-diagonal causal mask from the position ids
(`masking_utils.find_packed_sequence_indices`), so no token attends to another example's. The
first token of each example is never a label, so no example is scored on predicting the next
one's start. tests/test_packing.py holds the logits of a packed row equal to those of its
examples run one by one.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from labtune.data.chat import IGNORE_INDEX


def pack_rows(lengths: list[int], epoch: int, seed: int, length: int) -> list[list[int]]:
    """One epoch's rows: the examples in a seeded shuffled order, each row filled in that order
    until the next example would not fit (an example longer than `length` gets a row of its own)."""
    order = list(range(len(lengths)))
    random.Random(seed + epoch).shuffle(order)
    rows: list[list[int]] = []
    used = length + 1
    for index in order:
        if used + lengths[index] > length:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += lengths[index]
    return rows


def rank_rows(lengths: list[int], epoch: int, seed: int, rank: int, world: int, rows_per_batch: int,
              length: int, steps: int | None = None) -> list[list[list[int]]]:
    """This rank's micro-batches of packed rows for one epoch: every rank gets as many (the rows
    wrap around), so collectives never desynchronise; `steps` holds every epoch to one count."""
    rows = pack_rows(lengths, epoch, seed, length)
    per_step = world * rows_per_batch
    steps = steps or math.ceil(len(rows) / per_step)
    rows = (rows * math.ceil(steps * per_step / len(rows)))[: steps * per_step]
    batches = [rows[i : i + per_step] for i in range(0, len(rows), per_step)]
    return [batch[rank::world] for batch in batches]


def collate_packed(rows: list[list[dict[str, Any]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of examples -> input_ids, labels and position_ids, right-padded to the longest row;
    `segments` counts the examples (for the FLOP count's mean sequence length)."""
    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # counts real tokens; never passed to the model
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            n = len(example["input_ids"])
            input_ids[r, start : start + n] = torch.as_tensor(example["input_ids"])
            labels[r, start : start + n] = torch.as_tensor(example["labels"])
            labels[r, start] = IGNORE_INDEX  # never predicted from the example before it
            position_ids[r, start : start + n] = torch.arange(n)
            attention_mask[r, start : start + n] = 1
            start += n
        # the padding is one more "example" of its own, so it attends to nothing real
        position_ids[r, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask,
            "segments": torch.tensor(sum(len(row) for row in rows))}
