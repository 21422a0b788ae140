"""Model: Vicuna-style delta weights (apply and make, streamed shard by shard) and LoRA merging."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from labtune.models.merge import DeltaError, apply_delta, make_delta, merge_lora
from labtune.models.tensorfiles import Checkpoint, CheckpointError


def _model_dir(path: Path, tensors: dict, vocab: int, shards: int = 1) -> Path:
    """An HF-style directory; with shards > 1 the tensors are spread over several files + index."""
    path.mkdir()
    names = list(tensors)
    if shards == 1:
        save_file(tensors, path / "model.safetensors")
    else:
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, path / file)
            weight_map.update({n: file for n in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab}))
    return path


def _all(directory: Path) -> dict:
    with Checkpoint(directory) as checkpoint:
        return {name: checkpoint.read(name) for name in checkpoint.tensors}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def test_target_is_base_plus_delta_and_vocab_rows_beyond_base_come_from_delta(tmp_path):
    base = {"model.embed_tokens.weight": torch.randn(4, 3).to(torch.bfloat16), "w": torch.randn(2, 2)}
    delta = {"model.embed_tokens.weight": torch.randn(5, 3).to(torch.bfloat16), "w": torch.randn(2, 2)}
    out = tmp_path / "out"
    apply_delta(_model_dir(tmp_path / "base", base, 4), _model_dir(tmp_path / "delta", delta, 5), out)
    target = load_file(out / "model.safetensors")
    expected = delta["model.embed_tokens.weight"].float().clone()
    expected[:4] += base["model.embed_tokens.weight"].float()
    assert torch.equal(target["model.embed_tokens.weight"], expected.to(torch.bfloat16))
    assert torch.equal(target["w"], base["w"] + delta["w"])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 5


def test_vicuna_v0_vocabulary_32001_on_32000_rows(tmp_path):
    """Vicuna v0 added a pad token: the delta's embedding and lm_head have one more row."""
    base = {"model.embed_tokens.weight": torch.randn(32000, 8).half(), "lm_head.weight": torch.randn(32000, 8).half()}
    delta = {"model.embed_tokens.weight": torch.randn(32001, 8).half(), "lm_head.weight": torch.randn(32001, 8).half()}
    out = tmp_path / "out"
    apply_delta(_model_dir(tmp_path / "b", base, 32000), _model_dir(tmp_path / "d", delta, 32001), out)
    target = load_file(out / "model.safetensors")
    for name in base:
        assert target[name].shape == (32001, 8)
        assert torch.equal(target[name][-1], delta[name][-1])
        assert torch.equal(target[name][:32000], (base[name].float() + delta[name][:32000].float()).half())


def test_wrong_base_fails_naming_tensor_and_shapes_before_writing(tmp_path):
    base = {"w": torch.zeros(2, 3), "v": torch.zeros(3)}
    delta = {"w": torch.zeros(2, 4), "v": torch.zeros(3)}
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DeltaError, match=r"tensor w: base shape \(2, 3\) does not fit delta shape \(2, 4\)"):
        apply_delta(_model_dir(tmp_path / "b", base, 2), _model_dir(tmp_path / "d", delta, 2), out)
    assert not any(out.iterdir())


def test_delta_with_a_tensor_the_base_lacks_is_refused(tmp_path):
    with pytest.raises(DeltaError, match="delta tensor extra has no counterpart in the base"):
        apply_delta(_model_dir(tmp_path / "b", {"w": torch.zeros(2)}, 2),
                    _model_dir(tmp_path / "d", {"w": torch.zeros(2), "extra": torch.zeros(1)}, 2), tmp_path / "o")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_make_delta_then_apply_delta_reproduces_the_target_bit_for_bit(tmp_path, dtype):
    torch.manual_seed(0)
    base = {f"layers.{i}.w": torch.randn(64, 48).to(dtype) for i in range(5)}
    base["model.embed_tokens.weight"] = torch.randn(100, 48).to(dtype)
    target = {name: (t.float() + 0.01 * torch.randn_like(t.float())).to(dtype) for name, t in base.items()}
    target["model.embed_tokens.weight"] = torch.randn(103, 48).to(dtype)  # a grown vocabulary
    # cancellation that a narrow delta cannot carry: a large base value, a tiny target
    big, tiny = (60000.0, -1e-5) if dtype == torch.float16 else (300.0, -1e-2)
    base["layers.0.w"][0, :4] = torch.tensor([1000.0, -3000.0, big, 7.0]).to(dtype)
    target["layers.0.w"][0, :4] = torch.tensor([1e-3, 3e-4, tiny, 7.0 + 2 ** -7]).to(dtype)
    base_dir = _model_dir(tmp_path / "base", base, 100, shards=2)
    target_dir = _model_dir(tmp_path / "target", target, 103, shards=3)

    widened = make_delta(base_dir, target_dir, tmp_path / "delta", max_shard_bytes=20_000)
    assert len(list((tmp_path / "delta").glob("model-*.safetensors"))) > 1
    apply_delta(base_dir, tmp_path / "delta", tmp_path / "again", max_shard_bytes=30_000)
    again = _all(tmp_path / "again")
    assert set(again) == set(target)
    for name, tensor in target.items():
        assert again[name].dtype == dtype, name
        assert torch.equal(_bits(again[name]), _bits(tensor)), name
    if dtype != torch.float32:
        assert "layers.0.w" in widened
    assert json.loads((tmp_path / "again" / "config.json").read_text())["vocab_size"] == 103


def test_a_target_no_float_delta_can_reach_is_refused(tmp_path):
    base = _model_dir(tmp_path / "b", {"w": torch.tensor([1e30]).to(torch.bfloat16)}, 1)
    target = _model_dir(tmp_path / "t", {"w": torch.tensor([1e-30]).to(torch.bfloat16)}, 1)
    with pytest.raises(DeltaError, match="tensor w: no delta dtype reproduces the target exactly"):
        make_delta(base, target, tmp_path / "d")


def test_streamed_merge_of_bin_shards_equals_fastchat_in_memory_apply(tmp_path, tiny_model):
    """The delta as pickled .bin shards (as Vicuna's were published), merged without loading a
    model, equals FastChat's recipe: load both models, add every parameter, save."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float16)
    base.save_pretrained(tmp_path / "base16")  # LLaMA's published weights are fp16
    torch.manual_seed(1)
    state = {n: (0.02 * torch.randn_like(p.float())).half() for n, p in base.state_dict().items()}
    delta_dir = tmp_path / "delta"
    delta_dir.mkdir()
    names = list(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: state[n] for n in part}, delta_dir / file)
        weight_map.update({n: file for n in part})
    (delta_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        (delta_dir / name).write_bytes((tiny_model / name).read_bytes())

    apply_delta(tmp_path / "base16", delta_dir, tmp_path / "ours", max_shard_bytes=50_000)
    with torch.no_grad():
        for name, param in base.named_parameters():
            param += state[name]
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float16)
    expected = base.state_dict()
    for name, param in ours.state_dict().items():
        assert torch.equal(param, expected[name]), name
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"w": Exploit()}, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: refused to load with weights_only=True"):
        Checkpoint(bad)
    assert not marker.exists()


def test_truncated_safetensors_shard_is_named(tmp_path):
    path = _model_dir(tmp_path / "m", {"w": torch.zeros(64, 64)}, 2) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors: tensor w lies outside the file"):
        Checkpoint(path.parent)


def _peft_model(tiny_model: Path, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    return peft_model


@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
         alpha_pattern={"down_proj": 3}),
    dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "up_proj", "embed_tokens"],
         modules_to_save=["lm_head"]),
])
def test_lora_adapter_merges_to_peft_merge_and_unload(tmp_path, tiny_model, lora):
    peft_model = _peft_model(tiny_model, **lora)
    if "modules_to_save" in lora:
        with torch.no_grad():
            peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    counts = merge_lora(tiny_model, tmp_path / "adapter", tmp_path / "merged")
    expected = peft_model.merge_and_unload().state_dict()
    merged = _all(tmp_path / "merged")
    assert counts["merged"] == sum(1 for n in merged if any(f".{m}." in n or n.startswith(f"model.{m}.")
                                                            for m in lora["target_modules"]))
    changed = 0
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name
        changed += not torch.equal(tensor, load_file(tiny_model / "model.safetensors")[name])
    assert changed >= counts["merged"]
    assert (tmp_path / "merged" / "tokenizer.model").is_file() and (tmp_path / "merged" / "config.json").is_file()


def test_lora_on_the_wrong_base_is_refused(tmp_path, tiny_model):
    peft_model = _peft_model(tiny_model, r=4, lora_alpha=8, target_modules=["q_proj"])
    peft_model.save_pretrained(tmp_path / "adapter")
    wrong = tmp_path / "wrong"
    from labtune.models.tiny import make_tiny_llama

    make_tiny_llama(wrong, {"hidden_size": 32})
    with pytest.raises(DeltaError, match=r"tensor model.layers.0.self_attn.q_proj.weight: base shape \(32, 32\)"):
        merge_lora(wrong, tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dora_adapters_are_refused_with_a_reason(tmp_path, tiny_model):
    peft_model = _peft_model(tiny_model, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(DeltaError, match="use_dora: DoRA adapters cannot be merged"):
        merge_lora(tiny_model, tmp_path / "adapter", tmp_path / "out")


def _stage_recipe(tmp_path, *overrides):
    from conftest import TINY_RECIPE

    from labtune.recipe import load_recipe

    return load_recipe(TINY_RECIPE, [f"store.uri={tmp_path / 'store'}", *overrides])


def test_delta_stage_merges_a_lora_adapter_and_caches_it(tmp_path, tiny_model):
    from labtune.stages.delta import build_delta
    from labtune.stages.weights import build_weights
    from labtune.store.backends import LocalStore
    from labtune.store.outputs import fetch, read_manifest

    peft_model = _peft_model(tiny_model, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])
    peft_model.save_pretrained(tmp_path / "adapter")
    recipe = _stage_recipe(tmp_path, f"base_model.source={tiny_model}", f"delta.source={tmp_path / 'adapter'}")
    store = LocalStore(tmp_path / "store")
    base = build_weights(recipe, store)
    result = build_delta(recipe, store, base.uri)
    manifest = read_manifest(store, store.key_for(result.uri))
    assert manifest["delta_kind"] == "lora" and manifest["merged"] == 4
    merged = _all(fetch(store, result.uri))
    expected = peft_model.merge_and_unload().state_dict()
    assert all(torch.equal(merged[n], t) for n, t in expected.items())
    assert build_delta(recipe, store, base.uri).cached


def test_delta_stage_on_a_corrupted_base_output_fails_and_writes_no_manifest(tmp_path, tiny_model):
    from labtune.stages.delta import build_delta
    from labtune.stages.weights import build_weights
    from labtune.store.backends import LocalStore
    from labtune.store.outputs import ManifestError

    delta = _model_dir(tmp_path / "delta", {n: torch.zeros_like(t) for n, t in load_file(tiny_model / "model.safetensors").items()}, 2)
    recipe = _stage_recipe(tmp_path, f"base_model.source={tiny_model}", f"delta.source={delta}")
    store = LocalStore(tmp_path / "store")
    base = build_weights(recipe, store)
    shard = Path(base.uri) / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="model.safetensors: sha256 does not match the manifest"):
        build_delta(recipe, store, base.uri)
    assert not list((tmp_path / "store" / "delta").rglob("manifest.json"))
