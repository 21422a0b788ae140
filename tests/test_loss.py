"""The training loss on label tokens only equals transformers' loss, and so do its gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labtune.data.chat import IGNORE_INDEX
from labtune.recipe import TrainConfig
from labtune.training.distill import SoftTargets, soft_targets
from labtune.training.loss import AnswerLoss, predicting_positions
from labtune.training.model import attention_implementation


def small_llama(attention: str = "eager", tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied, attn_implementation=attention)
    return LlamaForCausalLM(config)


def chat_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Three right-padded rows whose labels cover only an answer span; the last row has none."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 300, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 6:12] = input_ids[0, 6:12]
    labels[1, 4:9] = input_ids[1, 4:9]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied, chunk_rows", [(True, None), (False, None), (True, 4), (False, 3)])
def test_the_label_token_loss_and_its_gradients_equal_the_plain_loss(tied, chunk_rows):
    batch = chat_batch()
    label_count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    plain = small_llama(tied=tied)
    expected = plain(**batch, num_items_in_batch=torch.tensor(label_count)).loss
    expected.backward()

    model = small_llama(tied=tied)
    names = list(model.state_dict())
    loss = AnswerLoss(model, chunk_rows)(model, batch, label_count)  # 11 label tokens: chunks of 4 or 3 rows
    loss.backward()

    assert list(model.state_dict()) == names  # the hook renames and wraps nothing
    assert torch.allclose(loss, expected, atol=1e-5, rtol=1e-5), (float(loss), float(expected))
    expected_grads, grads = gradients(plain), gradients(model)
    assert set(grads) == set(expected_grads)
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], atol=1e-5, rtol=1e-4), name


def test_in_chunks_no_more_than_one_chunk_of_logits_is_ever_computed():
    batch = chat_batch()
    model = small_llama()
    import labtune.training.loss as loss_module

    shapes: list[tuple[int, ...]] = []
    original = loss_module.F.linear

    def recording_linear(x, w, b=None):
        out = original(x, w, b)
        if w.shape[0] == 300 and out.shape[0]:  # the output layer (vocabulary 300), not its empty call
            shapes.append(tuple(out.shape))
        return out

    loss_module.F.linear = recording_linear
    try:
        loss = AnswerLoss(model, chunk_rows=4)(model, batch, 11)
        loss.backward()
    finally:
        loss_module.F.linear = original
    # forward: 4 + 4 + 3 rows; backward recomputes each chunk once; never all 11 rows at once
    assert sorted(shapes) == sorted([(4, 300), (4, 300), (3, 300)] * 2)
    assert AnswerLoss(small_llama()).chunk_rows == (1 << 24) // 300


def test_only_the_positions_before_a_label_reach_the_output_layer():
    batch = chat_batch()
    model = small_llama()
    seen: list[tuple[int, ...]] = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    AnswerLoss(model)(model, batch, 1.0)
    assert seen == [(11, 64)]  # 6 + 5 label tokens, each predicted from the position before it; none in row 3
    assert int(predicting_positions(batch["labels"]).sum()) == 11
    model(input_ids=batch["input_ids"])  # outside a loss the output layer sees every position
    assert seen[-1] == (3, 12, 64)


def test_a_lora_model_gets_the_same_loss_through_the_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    batch = chat_batch(seed=2)
    label_count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    model = get_peft_model(small_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    expected = model(**batch, num_items_in_batch=torch.tensor(label_count)).loss
    assert torch.allclose(AnswerLoss(model)(model, batch, label_count), expected, atol=1e-5)


def test_auto_attention_is_eager_on_a_cpu_and_gives_sdpa_s_loss():
    assert attention_implementation(TrainConfig(), torch.device("cpu")) == "eager"
    assert attention_implementation(TrainConfig(), torch.device("cuda", 0)) == "sdpa"
    assert attention_implementation(TrainConfig(attn_implementation="sdpa"), torch.device("cpu")) == "sdpa"
    batch = chat_batch(seed=3)
    losses = [small_llama(attention)(**batch).loss for attention in ("eager", "sdpa")]
    assert torch.allclose(losses[0], losses[1], atol=1e-6)


def soft_batch(model: torch.nn.Module, top_k: int, rows: list[int]) -> tuple[dict[str, torch.Tensor], SoftTargets]:
    """chat_batch with soft targets for the examples (batch rows) in `rows`, read from `model`."""
    batch = chat_batch()
    loss = AnswerLoss(model)

    def label_logits(chunk):
        part = {k: v[chunk] for k, v in batch.items()}
        return loss.label_logits(model, part), [int(c) for c in predicting_positions(part["labels"]).sum(dim=1)]

    examples = [{"labels": batch["labels"][i]} for i in range(3)]
    soft = soft_targets(model, rows, top_k, label_logits, batch_size=1)
    loss.remove()
    return {**batch, **soft.batch([0, 1, 2], examples)}, soft


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_soft_targets_from_the_model_itself_cost_nothing_and_pull_a_changed_model_back(chunk_rows):
    """Replay distillation: a model matched against its own distribution has a KL of zero on the
    soft rows (the loss left is the hard rows' cross-entropy), in one piece or in chunks; a model
    that moved away has a positive KL there, and its gradient points back."""
    model = small_llama()
    batch, soft = soft_batch(model, top_k=8, rows=[0])
    n0 = soft.label_counts[0]
    assert batch["soft_rows"].tolist() == [True] * n0 + [False] * (len(batch["soft_rows"]) - n0)
    assert batch["soft_logprobs"][:n0].exp().sum(-1).sub(1).abs().max() < 1e-5  # k tokens and the rest: all the mass

    loss = AnswerLoss(model, chunk_rows)
    hard_only = {k: v for k, v in chat_batch().items()}
    hard_only["labels"] = hard_only["labels"].clone()
    hard_only["labels"][0] = IGNORE_INDEX  # row 0's tokens now carry no loss at all
    assert torch.allclose(loss(model, batch, 1.0), loss(model, hard_only, 1.0), atol=1e-4)

    moved = small_llama()
    with torch.no_grad():
        moved.lm_head.weight.mul_(3.0)  # sharper everywhere: what cross-entropy on greedy answers did
    only_soft = {**batch, "labels": batch["labels"].clone()}
    only_soft["labels"][1:] = IGNORE_INDEX
    only_soft = {**only_soft, **{k: v[:n0] for k, v in batch.items() if k.startswith("soft_")}}
    kl = AnswerLoss(moved, chunk_rows)(moved, only_soft, 1.0)
    assert kl > 0.05
    kl.backward()
    with torch.no_grad():
        moved.lm_head.weight.sub_(0.5 * moved.lm_head.weight.grad)
        moved.lm_head.weight.grad = None
    assert AnswerLoss(moved)(moved, only_soft, 1.0) < kl


def test_soft_targets_keep_all_but_one_token_of_a_small_vocabulary():
    model = small_llama()  # 300 tokens
    _, soft = soft_batch(model, top_k=1024, rows=[0, 1])
    assert soft.top_k == 299
    ids, logprobs = soft.targets[1]
    assert ids.shape == (soft.label_counts[1], 299) and logprobs.shape == (soft.label_counts[1], 300)
    assert torch.isfinite(logprobs).all()


@pytest.mark.parametrize("packed", [False, True])
def test_soft_targets_line_up_with_the_label_tokens_of_padded_and_packed_batches(packed):
    """A micro-batch's soft rows are its soft examples' label tokens, wherever they sit: matched
    against the model's own distributions they add nothing, so the loss is the other examples' alone."""
    from labtune.training.batches import collate
    from labtune.training.packing import collate_packed

    model = small_llama()
    rng = torch.Generator().manual_seed(3)
    data = []
    for i in range(6):
        ids = torch.randint(1, 300, (6 + 2 * i,), generator=rng)
        labels = ids.clone()
        labels[: 3 + i % 3] = IGNORE_INDEX
        data.append({"input_ids": ids.numpy(), "labels": labels.numpy()})
    loss = AnswerLoss(model)

    def label_logits(chunk):
        batch = collate([data[i] for i in chunk], 0)
        return loss.label_logits(model, batch), [int(c) for c in predicting_positions(batch["labels"]).sum(dim=1)]

    soft = soft_targets(model, [1, 4], 8, label_logits, batch_size=2)
    rows = [[0, 1], [4, 2], [5]] if packed else [[3], [1], [4], [2]]
    make = (lambda masked: collate_packed([[masked[i] for i in row] for row in rows], 0)) if packed else \
        (lambda masked: collate([masked[row[0]] for row in rows], 0))
    batch = make(data)
    batch.update(soft.batch([i for row in rows for i in row], data))
    assert int(batch["soft_rows"].sum()) == soft.label_counts[1] + soft.label_counts[4]
    assert batch["soft_ids"].shape[0] == int(predicting_positions(batch["labels"]).sum())
    without = [{**e, "labels": torch.full((len(e["labels"]),), IGNORE_INDEX).numpy()} if i in (1, 4) else e
               for i, e in enumerate(data)]
    assert torch.allclose(loss(model, batch, 1.0), loss(model, make(without), 1.0), atol=1e-4)


def test_the_mixed_loss_and_its_written_out_gradient_equal_autograd_through_the_plain_formula():
    """Cross-entropy on hard rows, KL over the top k and the rest on soft rows: the loss's own
    backward (labtune/training/loss.py, _MixedLoss) against autograd on the textbook formula."""
    from labtune.training.loss import token_loss_sum

    generator = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(9, 50, generator=generator)).requires_grad_()
    targets = torch.randint(0, 50, (9,), generator=generator)
    rows = torch.tensor([True, False, True, True, False, False, True, False, True])
    teacher = (2 * torch.randn(9, 50, generator=generator)).log_softmax(-1)
    top, ids = teacher.topk(6, dim=-1)
    rest = teacher.scatter(1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    soft_logprobs = torch.cat([top, rest], dim=1)

    loss = token_loss_sum(logits, targets, ids, soft_logprobs, rows)
    loss.backward()
    got = logits.grad.clone()

    logits.grad = None
    logq = logits.log_softmax(-1)
    model = torch.cat([logq.gather(1, ids), logq.scatter(1, ids, float("-inf")).logsumexp(-1, keepdim=True)], dim=1)
    kl = (soft_logprobs.exp() * (soft_logprobs - model)).sum(-1)
    expected = torch.where(rows, kl, -logq.gather(1, targets[:, None]).squeeze(1)).sum()
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-4), (float(loss), float(expected))
    assert torch.allclose(got, logits.grad, atol=1e-5)


def test_a_soft_row_whose_top_tokens_hold_all_but_a_sliver_keeps_a_bounded_gradient():
    """A model sure of one token leaves its tail a mass below fp32's 1e-7: taken as 1 minus the top,
    that mass was noise and the tail's gradient reached 1e15 (a training step thrown away by
    clipping, one in sixty of the demo's). Summed, the loss and gradient match float64 autograd."""
    from labtune.training.loss import token_loss_sum

    logits = torch.zeros(2, 1000)
    logits[0, 5], logits[1, 7] = 30.0, 3.0
    logits.requires_grad_()
    ids = torch.tensor([[5, 6], [7, 8]])
    soft_logprobs = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.3, 0.2]]).log()
    loss = token_loss_sum(logits, torch.tensor([5, 7]), ids, soft_logprobs, torch.tensor([True, True]))
    loss.backward()
    assert logits.grad.abs().max() <= 1.0

    exact = logits.detach().double().requires_grad_()
    q = exact.softmax(-1)
    top = q.gather(1, ids)
    model = torch.cat([top, (1 - top.sum(-1))[:, None]], dim=1)
    expected = (soft_logprobs.double().exp() * (soft_logprobs.double() - model.log())).sum()
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert torch.allclose(logits.grad.double(), exact.grad, atol=1e-6)
