"""Meta's original LLaMA checkpoints (`consolidated.NN.pth`, `params.json`, `tokenizer.model`,
`checklist.chk`) converted to Hugging Face LLaMA format, one tensor at a time.

Model-parallel shards split each tensor along the dimension its layer is parallel in: the
column-parallel projections (wq, wk, wv, w1, w3, output) along their output rows, the
row-parallel ones (wo, w2) along their input columns, the embedding along the hidden size
(LLaMA 1/2) or the vocabulary; norms are replicated. wq and wk are also permuted, because Meta's
rotary embedding rotates interleaved pairs and transformers' rotates the two halves of each head.
Shards load with `torch.load(weights_only=True, mmap=True)`; files are md5-checked first.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from labtune.errors import LabtuneError
from labtune.models.tensorfiles import ShardedWriter, TensorInfo, dtype_name, torch_dtype

COLUMN_PARALLEL = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                   "attention.wv": "self_attn.v_proj", "feed_forward.w1": "mlp.gate_proj",
                   "feed_forward.w3": "mlp.up_proj"}
ROW_PARALLEL = {"attention.wo": "self_attn.o_proj", "feed_forward.w2": "mlp.down_proj"}
NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


class MetaCheckpointError(LabtuneError):
    """A Meta-format checkpoint is incomplete, corrupt or unsupported; the message names the file."""


def is_meta_checkpoint(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / "params.json").is_file() and any(directory.glob("consolidated.*.pth"))


def meta_files(directory: Path) -> list[Path]:
    """Files whose content defines the model: shards, params, tokenizer, checklist."""
    names = sorted(directory.glob("consolidated.*.pth")) + [directory / "params.json"]
    return names + [p for p in (_tokenizer_path(directory), directory / "checklist.chk") if p is not None and p.is_file()]


def _tokenizer_path(directory: Path) -> Path | None:
    # Meta's LLaMA 1 download keeps tokenizer.model beside the 7B/, 13B/ ... folders
    for candidate in (directory / "tokenizer.model", directory.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def md5_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_checklist(directory: str | Path, log=print) -> int:
    """Check every file listed in checklist.chk against its md5; returns how many were checked."""
    directory = Path(directory)
    checklist = directory / "checklist.chk"
    if not checklist.is_file():
        log(f"{directory}: no checklist.chk, md5 sums not checked")
        return 0
    checked = 0
    for number, line in enumerate(checklist.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 32:
            raise MetaCheckpointError(f"{checklist}:{number}: expected 'MD5  FILENAME', got {line.strip()[:80]!r}")
        expected, name = parts[0].lower(), parts[1].lstrip("*")
        path = directory / name
        if not path.is_file():
            raise MetaCheckpointError(f"{path}: listed in checklist.chk but missing")
        actual = md5_file(path)
        if actual != expected:
            raise MetaCheckpointError(f"{path}: md5 {actual} does not match checklist.chk ({expected}); "
                                      "the download is corrupt, fetch this file again")
        checked += 1
    return checked


def permute_for_hf(weight, heads: int):
    """Meta's interleaved rotary pairs -> transformers' half-split layout, per head."""
    rows, cols = weight.shape
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _load_shards(paths: list[Path]) -> list[dict]:
    import torch

    shards = []
    for path in paths:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise MetaCheckpointError(f"{path}: refused to load with weights_only=True ({first[:200]})") from None
        shards.append(state)
    return shards


def _concat_dim(name: str, shard_shape: tuple[int, ...], full_rows: int | None) -> int | None:
    """The dimension a tensor is split along across shards (None: replicated)."""
    if name in ("norm.weight",) or name.endswith("_norm.weight"):
        return None
    if name == "tok_embeddings.weight":
        return 0 if full_rows is not None and shard_shape[0] != full_rows else 1
    module = name.split(".", 2)[-1].removesuffix(".weight") if name.startswith("layers.") else name
    if module in ROW_PARALLEL:
        return 1
    return 0


def convert_meta_llama(directory: str | Path, out: str | Path, dtype: str | None = None,
                       max_shard_bytes: int = 2 * 10**9, log=print) -> dict:
    """Write the HF LLaMA model for a Meta checkpoint directory into out; returns its config."""
    directory, out = Path(directory), Path(out)
    params, tokenizer = read_params(directory)
    checked = verify_checklist(directory, log)
    paths = sorted(directory.glob("consolidated.*.pth"))
    log(f"converting Meta checkpoint {directory} ({len(paths)} shard(s), {checked} file(s) md5-checked)")
    shards = _load_shards(paths)
    mapping = tensor_names(params["n_layers"])
    for meta_name, _ in mapping:
        for path, shard in zip(paths, shards):
            if meta_name not in shard:
                raise MetaCheckpointError(f"{path}: tensor {meta_name} missing (params.json says {params['n_layers']} layers)")
    target = dtype or dtype_name(shards[0]["output.weight"].dtype)
    out.mkdir(parents=True, exist_ok=True)
    intermediate = _write_weights(directory, shards, mapping, params, target, out, max_shard_bytes)
    return _write_config_and_tokenizer(params, intermediate, target, tokenizer, out)


def read_params(directory: Path) -> tuple[dict, Path]:
    """params.json (dim, n_layers, n_heads, n_kv_heads, and vocab_size from the tokenizer when
    params.json leaves it at -1) and the tokenizer.model beside it."""
    try:
        params = json.loads((directory / "params.json").read_text())
        params["dim"], params["n_layers"], params["n_heads"]
    except (OSError, ValueError, KeyError) as exc:
        raise MetaCheckpointError(f"{directory / 'params.json'}: needs dim, n_layers and n_heads ({exc})") from None
    params["n_kv_heads"] = params.get("n_kv_heads") or params["n_heads"]
    tokenizer = _tokenizer_path(directory)
    if tokenizer is None:
        raise MetaCheckpointError(f"{directory}: tokenizer.model not found (here or one folder up)")
    if (params.get("vocab_size") or -1) <= 0:
        import sentencepiece as spm

        try:
            params["vocab_size"] = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
        except Exception:
            raise MetaCheckpointError(f"{tokenizer}: not a SentencePiece model (LLaMA 3's tiktoken tokenizer "
                                      "is not supported here: use the hf:// release)") from None
    return params, tokenizer


def tensor_names(n_layers: int) -> list[tuple[str, str]]:
    """(Meta name, HF name) of every tensor, in the order they are written."""
    mapping: list[tuple[str, str]] = [("tok_embeddings.weight", "model.embed_tokens.weight")]
    for layer in range(n_layers):
        for meta, hf in {**COLUMN_PARALLEL, **ROW_PARALLEL, **NORMS}.items():
            mapping.append((f"layers.{layer}.{meta}.weight", f"model.layers.{layer}.{hf}.weight"))
    return mapping + [("norm.weight", "model.norm.weight"), ("output.weight", "lm_head.weight")]


def _write_weights(directory: Path, shards: list, mapping: list[tuple[str, str]], params: dict, target: str, out: Path,
                   max_shard_bytes: int) -> int:
    """Each tensor assembled from the model-parallel shards (q and k permuted for HF's rotary
    layout) and written in turn; returns the MLP's intermediate size."""
    import torch

    vocab, n = params["vocab_size"], len(shards)

    def full_shape(meta_name: str) -> tuple[int, ...]:
        shape = list(shards[0][meta_name].shape)
        axis = _concat_dim(meta_name, tuple(shape), vocab)
        if axis is not None:
            shape[axis] *= n
        return tuple(shape)

    def assembled(meta_name: str):
        parts = [shard[meta_name] for shard in shards]
        axis = _concat_dim(meta_name, tuple(parts[0].shape), vocab)
        tensor = parts[0] if axis is None or n == 1 else torch.cat(parts, dim=axis)
        if meta_name.endswith("attention.wq.weight"):
            tensor = permute_for_hf(tensor, params["n_heads"])
        elif meta_name.endswith("attention.wk.weight"):
            tensor = permute_for_hf(tensor, params["n_kv_heads"])
        return tensor

    plan = [TensorInfo(hf, target, full_shape(meta)) for meta, hf in mapping]
    if plan[0].shape != (vocab, params["dim"]):
        raise MetaCheckpointError(f"{directory}: embedding assembles to {plan[0].shape}, expected ({vocab}, {params['dim']}); "
                                  "params.json or the shard set is inconsistent")
    writer = ShardedWriter(out, plan, max_shard_bytes)
    for (meta_name, hf_name), _ in zip(mapping, plan):
        writer.write(hf_name, assembled(meta_name).to(torch_dtype(target)))
    writer.close()
    return full_shape("layers.0.feed_forward.w1.weight")[0]


def _write_config_and_tokenizer(params: dict, intermediate: int, target: str, tokenizer: Path, out: Path) -> dict:
    eps = params.get("norm_eps", 1e-5)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": params["dim"],
        "intermediate_size": intermediate, "num_attention_heads": params["n_heads"],
        "num_key_value_heads": params["n_kv_heads"], "num_hidden_layers": params["n_layers"], "rms_norm_eps": eps,
        "vocab_size": params["vocab_size"], "rope_theta": params.get("rope_theta", 10000.0),
        # params.json has no context length: LLaMA 1 (norm_eps 1e-6) had 2048, LLaMA 2 4096
        "max_position_embeddings": params.get("max_seq_len") or (2048 if eps < 5e-6 else 4096),
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02, "use_cache": True, "dtype": target,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    (out / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": config["max_position_embeddings"],
        "legacy": False,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))
    return config
