"""The training loss on label tokens only equals transformers' loss, and so do its gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labtune.data.chat import IGNORE_INDEX
from labtune.recipe import TrainConfig
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
