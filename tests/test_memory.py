"""Fit, or fail before launch: the memory estimate against measured peaks, `gradient_checkpointing:
auto`, the pre-flight failure with the numbers and what would fit, and CPU offload."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_stage_inputs
from transformers import LlamaConfig, LlamaForCausalLM

from labtune.recipe import TrainConfig
from labtune.stages.train import TrainError, build_train
from labtune.store.outputs import fetch
from labtune.training.memory import GIB, Batch, Devices, DoesNotFit, Shape, activation_bytes_per_token, estimate, plan

LLAMA_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
LLAMA_1B = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_bytes_match_what_autograd_saves(attention, dtype):
    """The per-token term against the bytes autograd actually keeps (saved-tensor hooks) in a
    forward of a small LLaMA: within 10%."""
    config = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=300)
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).train()
    rows, length = 2, 128
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model.model(input_ids=torch.randint(0, 300, (rows, length)))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(size for pointer, size in saved.items() if pointer not in weights) / (rows * length * 3)
    estimated = activation_bytes_per_token(Shape.of_config(config), 2 if dtype == torch.bfloat16 else 4, attention, length)
    assert estimated == pytest.approx(measured, rel=0.10)


def test_shape_counts_the_parameters_the_model_has():
    shape = Shape.of_config(LLAMA_1B)
    with torch.device("meta"):
        model = LlamaForCausalLM(LLAMA_1B)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.layers == 22 and shape.root_params == 2 * 32000 * 2048 + 2048
    lora = Shape.of_config(LLAMA_1B, TrainConfig(lora=True, lora_r=8, lora_target_modules=["q_proj", "v_proj"]))
    assert lora.trainable == 22 * 8 * ((2048 + 2048) + (2048 + 4 * 64))  # A and B of q and v per layer


@pytest.mark.parametrize("tied", [True, False])
def test_frozen_weights_need_no_gradient_or_optimizer_state_in_the_estimate(tied):
    from labtune.training.model import freeze

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied)
    train = TrainConfig(freeze_layers=3)
    model = LlamaForCausalLM(config)
    freeze(model, train)
    assert Shape.of_config(config, train).trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert Shape.of_config(config, TrainConfig()).trainable == sum(p.numel() for p in model.parameters())


def test_auto_checkpointing_recomputes_only_as_much_as_the_memory_needs():
    shape = Shape.of_config(LLAMA_1B)
    rows = lambda n: Batch(n, 2048, n * 1024)  # noqa: E731
    train = TrainConfig(bf16=True, per_device_train_batch_size=8)
    needs = {mode: plan(train.model_copy(update={"gradient_checkpointing": mode}), 1, 1, shape, rows,
                        Devices("cuda", "big", 1000 * GIB, 1000 * GIB))[1].device for mode in (False, "selective", True)}
    assert needs[False] > needs["selective"] > needs[True]

    def chosen(budget: float) -> object:
        resolved, _ = plan(train, 1, 1, shape, rows, Devices("cuda", "test GPU", budget, 1000 * GIB))
        return resolved.gradient_checkpointing

    assert chosen(needs[False] + GIB) is False  # it fits: no recomputation, the fast path
    assert chosen((needs[False] + needs["selective"]) / 2) == "selective"
    assert chosen((needs["selective"] + needs[True]) / 2) is True
    with pytest.raises(DoesNotFit):
        chosen(needs[True] - GIB)


def test_a_full_8b_fine_tune_on_one_h200_fails_with_the_numbers_and_what_would_fit():
    shape = Shape.of_config(LLAMA_8B)
    h200 = Devices("cuda", "NVIDIA H200 (139.8 GiB, planned to 92%)", 139.8 * GIB * 0.92, 250 * GIB, 1)
    with pytest.raises(DoesNotFit) as failure:
        plan(TrainConfig(bf16=True), 1, 1, shape, lambda n: Batch(n, 2048, n * 2048), h200)
    message = str(failure.value)
    assert "\n" not in message
    assert "NVIDIA H200 (139.8 GiB, planned to 92%) gives 128.62 GiB per rank" in message
    assert "parameters 29.9, gradients 29.9, optimizer 59.8" in message  # 8.03B x 4, 4 and 8 bytes
    assert "train.lora=true" in message and "2 GPUs like this one" in message
    # host memory for the offloaded state (8.03B x 16 bytes) is there: offload is among the fixes
    assert "train.fsdp='full_shard auto_wrap offload'" in message
    offload = TrainConfig(bf16=True, fsdp="full_shard auto_wrap offload")
    resolved, est = plan(offload, 1, 1, shape, lambda n: Batch(n, 2048, n * 2048), h200)
    assert est.parts["optimizer"] == 0 and est.host == pytest.approx(16 * shape.params)
    # the GPU keeps the activations and the gathered compute copies: room enough to skip recomputation
    assert resolved.gradient_checkpointing is False and est.device < 40 * GIB
    # with too little host memory for it, offload is not offered
    small_host = Devices("cuda", "NVIDIA H200", 139.8 * GIB * 0.92, 100 * GIB, 1)
    with pytest.raises(DoesNotFit, match="train.lora=true") as failure:
        plan(TrainConfig(bf16=True), 1, 1, shape, lambda n: Batch(n, 2048, n * 2048), small_host)
    assert "offload" not in str(failure.value)


@pytest.fixture(scope="module")
def wider_inputs(tmp_path_factory):
    """A random LLaMA of 25M parameters: large enough that its states and activations, not the
    Python runtime, make up most of a rank's memory."""
    return tiny_stage_inputs(tmp_path_factory.mktemp("memory"), [
        "base_model.tiny.hidden_size=512", "base_model.tiny.intermediate_size=1536", "base_model.tiny.num_hidden_layers=8",
        "base_model.tiny.num_attention_heads=8", "base_model.tiny.num_key_value_heads=4"])


def test_the_estimate_is_within_a_quarter_of_the_measured_peak_and_auto_resolves_before_launch(wider_inputs):
    recipe, store, target_uri, tokens_uri = wider_inputs
    lines: list[str] = []
    result = build_train(recipe, store, target_uri, tokens_uri, log=lines.append)
    memory = json.loads((fetch(store, result.uri) / "manifest.json").read_text())["memory"]
    measured = max(memory["measured_peak_gib"])  # peak resident memory of each rank, from the worker
    assert memory["estimate_gib"] == pytest.approx(measured, rel=0.25), memory
    assert memory["parts_gib"]["parameters"] > 0 and memory["parts_gib"]["activations"] > 0
    # auto: the model fits without recomputation, so none is done; said before torchrun launched
    assert memory["gradient_checkpointing"] is False
    said = [i for i, line in enumerate(lines) if line.startswith("memory: ")]
    launched = [i for i, line in enumerate(lines) if line.startswith("launching: ")]
    assert said and launched and said[0] < launched[0]
    assert "gradient_checkpointing auto -> False" in lines[said[0]]


def test_an_impossible_recipe_fails_in_pre_flight_with_the_numbers(wider_inputs):
    recipe, store, target_uri, tokens_uri = wider_inputs
    small = recipe.model_copy(deep=True)
    small.parallel.memory_per_rank_gib = 0.6  # less than the runtime and the states together
    small.train.seed = 7  # not the run above, which the store holds already (a stored stage is not re-checked)
    lines: list[str] = []
    with pytest.raises(TrainError) as failure:
        build_train(small, store, target_uri, tokens_uri, log=lines.append)
    message = str(failure.value)
    assert message.startswith("train: the model does not fit: ") and "\n" not in message
    assert "GiB per rank at peak" in message and "parameters 0.1" in message and "Would fit" in message
    assert "parallel.memory_per_rank_gib (CPU) gives 0.60 GiB per rank" in message
    assert not any(line.startswith("launching: ") for line in lines)  # torchrun never started


def test_cpu_offload_trains_to_the_same_losses(tmp_path):
    """fsdp `offload` (FSDP2's CPUOffloadPolicy) on two CPU ranks: the same losses as without."""
    recipe, store, target_uri, tokens_uri = tiny_stage_inputs(tmp_path)
    losses = {}
    for fsdp in ("full_shard auto_wrap", "full_shard auto_wrap offload"):
        variant = recipe.model_copy(deep=True)
        variant.train.fsdp, variant.train.save_strategy = fsdp, "no"
        out = fetch(store, build_train(variant, store, target_uri, tokens_uri, log=lambda line: None).uri)
        losses[fsdp] = [r["loss"] for r in json.loads((out / "train_metrics.json").read_text())["history"]]
    assert len(losses["full_shard auto_wrap"]) >= 3
    assert losses["full_shard auto_wrap offload"] == pytest.approx(losses["full_shard auto_wrap"], rel=1e-5)


def test_estimate_moves_offloaded_state_to_host_memory():
    shape = Shape.of_config(LLAMA_1B)
    batch = Batch(2, 2048, 2048)
    from labtune.training.memory import Setup

    plain = estimate(shape, batch, Setup("cuda", 1, True))
    offloaded = estimate(shape, batch, Setup("cuda", 1, True, offload=True))
    assert offloaded.device == pytest.approx(plain.device - 16 * shape.params)
    assert offloaded.host == pytest.approx(16 * shape.params) and plain.host == 0
