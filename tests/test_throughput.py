"""Honest throughput: FLOPs per token by a stated formula, a peak only for a known device, and the
train stage's tokens/s equal to tokens over the synchronized step time."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labtune.training.throughput import FlopsModel, mfu, peak_flops, peak_flops_of


def small_llama(tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tied", [True, False])
def test_flops_count_the_matmul_weights_and_the_output_layer_on_label_tokens_only(tied):
    model = small_llama(tied)
    counted = FlopsModel.of(model)
    # per layer: q, o (64 x 64), k, v (64 x 32), gate, up, down (64 x 128): the norms do not count
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    assert (counted.trained, counted.frozen, counted.head, counted.head_trains) == (2 * per_layer, 0, 300 * 64, True)
    assert counted.flops(tokens=100, label_tokens=30, mean_length=50) == \
        6 * 2 * per_layer * 100 + 6 * 300 * 64 * 30 + 12 * 2 * 64 * 50 * 100


def test_frozen_weights_cost_four_flops_not_six():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(small_llama(True), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    counted = FlopsModel.of(model)
    lora = 2 * (4 * 64 + 4 * 64) + 2 * (4 * 64 + 4 * 32)  # A and B of q and v, two layers
    assert counted.trained == lora and counted.frozen == FlopsModel.of(small_llama(True)).trained
    assert not counted.head_trains
    assert counted.flops(10, 10, 5) == (6 * lora + 4 * counted.frozen) * 10 + 4 * counted.head * 10 + 12 * 2 * 64 * 5 * 10


def test_frozen_layers_below_every_trained_one_cost_two_flops():
    """Embeddings and layer 0 frozen: layer 0 is forward only (2), layer 1 trains (6), the tied
    output layer is frozen but passes gradients down (4). With the embeddings training, a frozen
    layer 0 still passes gradients down to them (4)."""
    model = small_llama(True)
    model.get_input_embeddings().weight.requires_grad_(False)
    model.model.layers[0].requires_grad_(False)
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    counted = FlopsModel.of(model)
    assert (counted.trained, counted.frozen, counted.inert, counted.head_trains) == (per_layer, 0, per_layer, False)
    assert counted.flops(10, 4, 5) == (6 + 2) * per_layer * 10 + 4 * 300 * 64 * 4 + 12 * 2 * 64 * 5 * 10
    assert counted.forward_flops(10, 4, 5) == 2 * 2 * per_layer * 10 + 2 * 300 * 64 * 4 + 4 * 2 * 64 * 5 * 10
    model.get_input_embeddings().weight.requires_grad_(True)
    assert (FlopsModel.of(model).frozen, FlopsModel.of(model).inert) == (per_layer, 0)


def test_the_peak_comes_from_the_device_name_and_is_never_guessed():
    assert peak_flops_of("NVIDIA H200") == 989e12
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_of("NVIDIA L40S") == 362e12 and peak_flops_of("NVIDIA L40") == 181e12
    assert peak_flops_of("NVIDIA GeForce RTX 4090") == 165e12
    assert peak_flops_of("Tesla V100-SXM2-32GB") is None  # no bf16 tensor cores: not in the table
    assert peak_flops(torch.device("cpu")) is None
    assert mfu(1e12, 1.0, None, 1) is None
    assert mfu(494.5e12, 1.0, 989e12, 1) == pytest.approx(0.5)
    assert mfu(989e12, 1.0, 989e12, 2) == pytest.approx(0.5)


def test_auto_settings_resolve_as_documented():
    from labtune.recipe import TrainConfig
    from labtune.training.model import checkpointing_every, compile_wanted
    from labtune.training.worker_config import WorkerError

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert TrainConfig().torch_compile == "auto"
    assert not compile_wanted(TrainConfig(), cpu) and compile_wanted(TrainConfig(), gpu)
    assert compile_wanted(TrainConfig(torch_compile=True), cpu) and not compile_wanted(TrainConfig(torch_compile=False), gpu)
    assert TrainConfig().gradient_checkpointing == "auto"  # resolved by the train stage's memory plan (test_memory.py)
    with pytest.raises(WorkerError, match="unresolved"):
        checkpointing_every(TrainConfig())
    assert checkpointing_every(TrainConfig(gradient_checkpointing=False)) == 0
    assert checkpointing_every(TrainConfig(gradient_checkpointing=True)) == 1  # FastChat's meaning: every layer
    assert checkpointing_every(TrainConfig(gradient_checkpointing="selective")) == 2
    assert checkpointing_every(TrainConfig(gradient_checkpointing="selective", gradient_checkpointing_every_n_layers=3)) == 3


def test_selective_checkpointing_recomputes_every_second_layer_with_the_same_gradients():
    from labtune.recipe import TrainConfig
    from labtune.training.model import checkpointing_every

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = {}
    for mode in (False, "selective", True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        every = checkpointing_every(TrainConfig(gradient_checkpointing=mode))
        if every:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                                  every_n_layers=every)
        model.train()
        flags = [layer.gradient_checkpointing for layer in model.model.layers]
        assert flags == {False: [False] * 4, "selective": [True, False, True, False], True: [True] * 4}[mode]
        model(input_ids=ids, labels=ids).loss.backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(grads["selective"], grads[False], atol=1e-6)
    assert torch.allclose(grads[True], grads[False], atol=1e-6)
