"""Writers for the formats labs receive weights in, made from a tiny HF model for the tests:
Meta's original sharded checkpoint, and a Hugging Face hub cache as `snapshot_download` leaves it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

SPLIT_ROWS = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output")
SPLIT_COLS = ("attention.wo", "feed_forward.w2", "tok_embeddings")


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = weight.shape
    return weight.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def save_meta_checkpoint(hf_dir: Path, out: Path, shards: int = 2) -> Path:
    """Write hf_dir's LLaMA as Meta's consolidated.NN.pth shards, params.json, tokenizer.model and
    checklist.chk, split across shards the way Meta's model-parallel layers split them."""
    config = json.loads((hf_dir / "config.json").read_text())
    state = load_file(hf_dir / "model.safetensors")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    meta = {"tok_embeddings.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"],
            "output.weight": state["lm_head.weight"], "rope.freqs": torch.ones(4)}
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    for layer in range(config["num_hidden_layers"]):
        for hf, m in names.items():
            tensor = state[f"model.layers.{layer}.{hf}.weight"]
            if m == "attention.wq":
                tensor = _unpermute(tensor, heads)
            elif m == "attention.wk":
                tensor = _unpermute(tensor, kv_heads)
            meta[f"layers.{layer}.{m}.weight"] = tensor
    out.mkdir(parents=True)
    for index in range(shards):
        shard = {}
        for name, tensor in meta.items():
            module = name.removesuffix(".weight").split(".", 2)[-1] if name.startswith("layers.") else name.removesuffix(".weight")
            if module in SPLIT_ROWS:
                shard[name] = tensor.chunk(shards, dim=0)[index].clone()
            elif module in SPLIT_COLS:
                shard[name] = tensor.chunk(shards, dim=1)[index].clone()
            else:
                shard[name] = tensor.clone()
        torch.save(shard, out / f"consolidated.{index:02d}.pth")
    (out / "params.json").write_text(json.dumps({
        "dim": config["hidden_size"], "n_layers": config["num_hidden_layers"], "n_heads": heads,
        "n_kv_heads": kv_heads, "multiple_of": 32, "norm_eps": config["rms_norm_eps"], "vocab_size": -1,
        "max_seq_len": config["max_position_embeddings"]}))
    shutil.copyfile(hf_dir / "tokenizer.model", out / "tokenizer.model")
    lines = [f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.name}" for p in sorted(out.iterdir())]
    (out / "checklist.chk").write_text("\n".join(lines) + "\n")
    return out


def populate_hub_cache(hf_home: Path, repo_id: str, model_dir: Path, commit: str = "a" * 40) -> Path:
    """Lay model_dir out as huggingface_hub's cache holds a downloaded repo: blobs named by sha256,
    a snapshot folder of symlinks named by the commit, and refs/main pointing at it."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in sorted(model_dir.iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, repo / "blobs" / digest)
        (snapshot / path.name).symlink_to(Path("../../blobs") / digest)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
