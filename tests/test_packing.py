"""Packing never lets one example see another: the logits and the loss of a packed row equal those
of its examples run one by one; rows are filled in a seeded order and every rank gets as many."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labtune.data.chat import IGNORE_INDEX
from labtune.training.batches import collate
from labtune.training.loss import AnswerLoss
from labtune.training.packing import collate_packed, pack_rows, rank_rows


def examples(lengths: list[int], seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    found = []
    for n in lengths:
        ids = torch.randint(3, 300, (n,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]  # the second half is the answer
        found.append({"input_ids": ids, "labels": labels})
    return found


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_packed_row_gives_each_example_the_logits_it_has_alone(attention):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=300, attn_implementation=attention)).eval()
    batch = examples([7, 12, 5, 9])
    rows = [batch[:3], batch[3:]]  # two rows: three examples, then one (padded)
    packed = collate_packed(rows, pad_id=0)
    assert packed["position_ids"][0, :7].tolist() == list(range(7)) and packed["position_ids"][0, 7:19].tolist() == list(range(12))
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        for r, row in enumerate(rows):
            start = 0
            for example in row:
                n = len(example["input_ids"])
                alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
                torch.testing.assert_close(logits[r, start : start + n], alone, atol=1e-5, rtol=1e-4)
                start += n
    # without the position ids (one long sequence) the second example would see the first
    with torch.no_grad():
        leaked = model(input_ids=packed["input_ids"][:1, :19], use_cache=False).logits[0, 7:19]
        alone = model(input_ids=torch.tensor([batch[1]["input_ids"]])).logits[0]
    assert not torch.allclose(leaked, alone, atol=1e-3)


def test_the_packed_loss_and_its_gradients_equal_the_unpacked_ones():
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=300, attn_implementation="eager"))
    batch = examples([9, 14, 6, 11, 8], seed=3)
    loss = AnswerLoss(model)
    packed = collate_packed([batch[:2], batch[2:]], pad_id=0)
    plain = collate(batch, pad_id=0)
    # the first token of each packed example is never a label: the same count as unpacked
    labelled = int((plain["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int((packed["labels"][:, 1:] != IGNORE_INDEX).sum()) == labelled
    grads = []
    for b in (packed, plain):
        model.zero_grad()
        value = loss(model, b, labelled)
        value.backward()
        grads.append((float(value.detach()), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_rows_fill_in_a_seeded_order_and_every_rank_gets_as_many():
    lengths = [50, 60, 70, 500, 30, 40, 90, 10] * 5
    rows = pack_rows(lengths, epoch=0, seed=7, length=256)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each example once
    assert all(sum(lengths[i] for i in row) <= 256 or len(row) == 1 for row in rows)
    assert rows == pack_rows(lengths, 0, 7, 256) and rows != pack_rows(lengths, 1, 7, 256)
    per_rank = [rank_rows(lengths, 0, 7, rank, 2, 3, 256) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) and all(len(b) == 3 for r in per_rank for b in r)
    assert len(rank_rows(lengths, 0, 7, 0, 2, 3, 256, steps=9)) == 9
