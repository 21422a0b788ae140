"""Model: Vicuna-style delta application (target = base + delta, FastChat's semantics)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tasks.delta import DeltaError, apply_delta


def _model_dir(path, tensors, vocab):
    path.mkdir()
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab}))
    return path


def test_target_is_base_plus_delta_and_vocab_rows_beyond_base_come_from_delta(tmp_path):
    base = {"model.embed_tokens.weight": torch.randn(4, 3).to(torch.bfloat16), "w": torch.randn(2, 2)}
    delta = {"model.embed_tokens.weight": torch.randn(5, 3).to(torch.bfloat16), "w": torch.randn(2, 2)}
    out = tmp_path / "out"
    out.mkdir()
    apply_delta(_model_dir(tmp_path / "base", base, 4), _model_dir(tmp_path / "delta", delta, 5), out)
    target = load_file(out / "model.safetensors")
    expected = delta["model.embed_tokens.weight"].float().clone()
    expected[:4] += base["model.embed_tokens.weight"].float()
    assert torch.equal(target["model.embed_tokens.weight"], expected.to(torch.bfloat16))
    assert torch.equal(target["w"], base["w"] + delta["w"])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 5


def test_wrong_base_fails_naming_tensor_and_shapes_before_writing(tmp_path):
    base = {"w": torch.zeros(2, 3)}
    delta = {"w": torch.zeros(2, 4)}
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DeltaError, match=r"tensor w: base shape \(2, 3\) does not fit delta shape \(2, 4\)"):
        apply_delta(_model_dir(tmp_path / "b", base, 2), _model_dir(tmp_path / "d", delta, 2), out)
    assert not any(out.iterdir())
