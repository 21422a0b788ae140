"""The tokenize stage's examples as the worker reads them: memory-mapped, padded to the longest
of each micro-batch, and dealt to the ranks in equal numbers every epoch."""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from labtune.data.chat import IGNORE_INDEX
from labtune.recipe import TrainConfig
from labtune.training import packing


def load_examples(train_dir: str) -> tuple[Any, list[int]]:
    """The tokenize stage's examples (input_ids, labels, length), memory-mapped Arrow."""
    from datasets import load_from_disk

    dataset = load_from_disk(train_dir)
    lengths = list(dataset["length"])
    # numpy rows straight from Arrow: no Python list of ints per token on the step's critical path
    return dataset.with_format("numpy", columns=["input_ids", "labels"]), lengths



def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch (not to model_max_length)."""
    width = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.as_tensor(example["input_ids"])
        labels[row, :n] = torch.as_tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}



def rank_batches(lengths: list[int], epoch: int, seed: int, rank: int, world: int, batch_size: int,
                 group_size: int = 16) -> list[list[int]]:
    """This rank's micro-batches for one epoch. Every rank gets the same number of batches
    (the shuffled order wraps around), so collectives never desynchronise, whatever the data size.
    Within each window of group_size steps, examples are sorted by length so that a batch holds
    examples of similar length and little compute goes to padding."""
    n_examples = len(lengths)
    rng = random.Random(seed + epoch)
    order = list(range(n_examples))
    rng.shuffle(order)
    per_step = world * batch_size
    steps = math.ceil(n_examples / per_step)
    order = (order * math.ceil(steps * per_step / n_examples))[: steps * per_step]
    window = per_step * group_size
    grouped = []
    for start in range(0, len(order), window):
        grouped += sorted(order[start : start + window], key=lambda i: lengths[i])
    steps_order = [grouped[i : i + per_step] for i in range(0, len(grouped), per_step)]
    rng.shuffle(steps_order)
    return [step[rank::world] for step in steps_order]



def micro_batches_per_epoch(train: TrainConfig, lengths: list[int], world: int) -> int:
    """Micro-batches per rank and epoch: of examples, or with packing of the rows the first
    epoch's order packs into (every epoch is held to that many)."""
    per_step = world * train.per_device_train_batch_size
    if train.packing:
        return math.ceil(len(packing.pack_rows(lengths, 0, train.seed, int(train.packing_length))) / per_step)
    return math.ceil(len(lengths) / per_step)
