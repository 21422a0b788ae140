"""The frozen lowest layers computed once (labtune/training/frozen_prefix.py): a step that starts from the
cached states has the loss and the gradients of the full forward, padded and packed."""

import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labtune.data.chat import IGNORE_INDEX
from labtune.recipe import TrainConfig
from labtune.training.batches import collate
from labtune.training.frozen_prefix import FrozenPrefix, why_not
from labtune.training.loss import AnswerLoss
from labtune.training.model import freeze
from labtune.training.packing import collate_packed
from labtune.training.throughput import decoder_layers


def tiny_model(layers=4, dropout=0.0):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, attention_dropout=dropout)
    return LlamaForCausalLM(config)


def examples(count=7):
    rng = torch.Generator().manual_seed(1)
    out = []
    for i in range(count):
        n = 5 + 3 * i
        ids = torch.randint(0, 300, (n,), generator=rng)
        labels = ids.clone()
        labels[: n // 2] = IGNORE_INDEX  # the prompt half carries no loss
        out.append({"input_ids": ids.numpy(), "labels": labels.numpy()})
    return out


def loss_and_grads(model, batch, context=None):
    model.zero_grad(set_to_none=True)
    with context or contextlib.nullcontext():
        loss = AnswerLoss(model)(model, batch, 10.0)
        layers_run = len(model.model.layers)
    loss.backward()
    return layers_run, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [False, True])
def test_a_step_from_the_cached_states_has_the_full_forward_s_loss_and_gradients(packed):
    model = tiny_model()
    freeze(model, TrainConfig(freeze_layers=2))
    data = examples()
    prefix = FrozenPrefix.build(model, decoder_layers(model), data, torch.device("cpu"), autocast=False, batch_size=3)
    assert prefix.depth == 2 and [s.shape[0] for s in prefix.states] == [len(e["input_ids"]) for e in data]
    rows = [[0, 3], [5], [1, 2, 6]] if packed else [[4], [0], [6], [2]]
    batch = collate_packed([[data[i] for i in row] for row in rows], 0) if packed else \
        collate([data[row[0]] for row in rows], 0)
    full_layers, full_loss, full_grads = loss_and_grads(model, batch)
    cached = {**batch, "inputs_embeds": prefix.embeds(rows, batch["input_ids"].shape[1])}
    cached_layers, cached_loss, cached_grads = loss_and_grads(model, cached, prefix.skipping())
    assert (full_layers, cached_layers, len(model.model.layers)) == (4, 2, 4)  # only the trained layers ran; whole again
    assert cached_loss == pytest.approx(float(full_loss), rel=1e-5)
    assert full_grads.keys() == cached_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_nothing_is_cached_where_the_frozen_output_could_change_or_nothing_is_frozen():
    layers_of = decoder_layers
    frozen = tiny_model()
    freeze(frozen, TrainConfig(freeze_layers=2))
    assert why_not(frozen, layers_of(frozen), sharded=False, tokens=1000) is None
    assert "sharded" in why_not(frozen, layers_of(frozen), sharded=True, tokens=1000)
    assert "GiB" in why_not(frozen, layers_of(frozen), sharded=False, tokens=10**8)
    dropping = tiny_model(dropout=0.1)
    freeze(dropping, TrainConfig(freeze_layers=2))
    assert "dropout" in why_not(dropping, layers_of(dropping), sharded=False, tokens=1000)
    embeddings_train = tiny_model()
    embeddings_train.model.layers[0].requires_grad_(False)  # a frozen layer above trained embeddings
    assert "no frozen layers" in why_not(embeddings_train, layers_of(embeddings_train), sharded=False, tokens=1000)


def test_dev_questions_score_the_same_from_the_cached_states():
    model = tiny_model()
    freeze(model, TrainConfig(freeze_layers=3))
    data = examples(5)
    prefix = FrozenPrefix.build(model, decoder_layers(model), data, torch.device("cpu"), autocast=False)
    batch = collate(data, 0)
    loss = AnswerLoss(model)
    exact, full = loss.exact(model, batch)
    with prefix.skipping():
        cached_exact, cached = loss.exact(model, {**batch, "inputs_embeds": prefix.embeds([[i] for i in range(5)],
                                                                                           batch["input_ids"].shape[1])})
    assert torch.equal(exact, cached_exact) and float(cached) == pytest.approx(float(full), rel=1e-5)


def test_lora_against_the_upper_layers_puts_adapters_only_above_the_frozen_ones_and_caches_below():
    """train.lora with freeze_layers: adapters in the upper layers only, so the lower layers hold
    nothing that trains and are computed once; the step from the cache has the full step's loss
    and adapter gradients."""
    from peft import get_peft_model

    from labtune.training.frozen_prefix import inert_depth
    from labtune.training.model import apply_lora

    model = tiny_model()
    train = TrainConfig(lora=True, freeze_layers=3, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"])
    freeze(model, train)
    model = get_peft_model(model, apply_lora(model, train))
    layers = decoder_layers(model)
    adapted = {i for i, layer in enumerate(layers) for n, p in layer.named_parameters() if p.requires_grad}
    assert adapted == {3} and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert inert_depth(model, layers) == 3 and why_not(model, layers, sharded=False, tokens=100) is None
    torch.manual_seed(2)
    for n, p in model.named_parameters():  # peft starts lora_B at zero: give the adapters something to say
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    data = examples()
    prefix = FrozenPrefix.build(model, layers, data, torch.device("cpu"), autocast=False, batch_size=3)
    batch = collate([data[i] for i in (4, 0, 6)], 0)

    def adapter_loss_and_grads(batch, context=None):
        model.zero_grad(set_to_none=True)
        with context or contextlib.nullcontext():
            loss = AnswerLoss(model)(model, batch, 10.0)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full_loss, full_grads = adapter_loss_and_grads(batch)
    cached = {**batch, "inputs_embeds": prefix.embeds([[4], [0], [6]], batch["input_ids"].shape[1])}
    cached_loss, cached_grads = adapter_loss_and_grads(cached, prefix.skipping())
    assert torch.allclose(full_loss, cached_loss, atol=1e-5)
    assert full_grads.keys() == cached_grads.keys() and len(full_grads) == 4
    assert all(torch.allclose(full_grads[n], cached_grads[n], atol=1e-5) for n in full_grads)
