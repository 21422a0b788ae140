"""Delta weights and LoRA adapters, merged tensor by tensor without holding a model in memory.

- `apply_delta(base, delta, out)`: FastChat's semantics. Each target tensor is base + delta;
  rows beyond the base's vocabulary (Vicuna v0 added a pad token: 32001 rows on a 32000-row
  base) come from the delta alone; the tokenizer and config come from the delta.
- `make_delta(base, target, out)`: the inverse. Every delta tensor is checked to reproduce its
  target tensor bit for bit through `apply_delta`; one that would not in the target's dtype is
  stored in float32 (float64 if need be), so the round trip is exact.
- `merge_lora(base, adapter, out)`: a PEFT LoRA adapter folded into the base, with PEFT's math
  (W + scale * B @ A, scale = lora_alpha / r, or / sqrt(r) with rsLoRA).

Half-precision sums are computed in float32 and cast back. Every shape is checked before the
first byte is written; output is HF safetensors shards, streamed one block of rows at a time.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

from labtune.errors import LabtuneError
from labtune.models.tensorfiles import (
    Checkpoint,
    CheckpointError,
    ShardedWriter,
    TensorInfo,
    row_blocks,
    torch_dtype,
    weight_files,
)

DEFAULT_SHARD_BYTES = 2 * 10**9
TARGET_DTYPES = "labtune_target_dtypes"  # delta metadata: tensors stored wider than their target
IGNORED = ("rotary_emb.inv_freq",)  # buffers of old checkpoints, recomputed by transformers
MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt",
)
TOKENIZER_FILES = tuple(f for f in MODEL_FILES if f not in ("config.json", "generation_config.json"))


class Progress(Protocol):
    """Told the output's total bytes once, then the bytes of each block as it is written."""

    def start(self, total: int) -> None: ...
    def advance(self, done: int) -> None: ...


def _start(progress: Progress | None, plan: list[TensorInfo]):
    if progress is None:
        return None
    progress.start(sum(info.nbytes for info in plan))
    return progress.advance


class DeltaError(LabtuneError):
    """The delta or adapter does not fit the base; the message names the tensor and both shapes."""


def _weights(directory: Path) -> Checkpoint:
    try:
        return Checkpoint(directory)
    except CheckpointError as exc:
        raise DeltaError(str(exc)) from None


def _names(checkpoint: Checkpoint) -> list[str]:
    return [n for n in checkpoint.tensors if not n.endswith(IGNORED)]


def _fits(base: TensorInfo, other: TensorInfo) -> bool:
    """Same shape, or more rows along dim 0 (a grown vocabulary)."""
    return base.shape == other.shape or (
        len(base.shape) == len(other.shape) >= 1 and other.shape[0] > base.shape[0] and other.shape[1:] == base.shape[1:]
    )


def _check_pair(base: Checkpoint, other: Checkpoint, what: str) -> list[str]:
    names = _names(other)
    missing = [n for n in names if n not in base.tensors]
    if missing:
        raise DeltaError(f"{what} tensor {missing[0]} has no counterpart in the base model (wrong base?)")
    extra = [n for n in _names(base) if n not in other.tensors]
    if extra:
        raise DeltaError(f"base tensor {extra[0]} is missing from the {what} (wrong base?)")
    for name in names:
        b, o = base.tensors[name], other.tensors[name]
        if not _fits(b, o):
            raise DeltaError(f"tensor {name}: base shape {b.shape} does not fit {what} shape {o.shape} (wrong base?)")
        if not torch_dtype(o.dtype).is_floating_point:
            raise DeltaError(f"tensor {name}: {what} dtype {o.dtype} is not floating point")
    return names


def _compute_dtype(dtype: str):
    import torch

    return torch.float64 if dtype == "float64" else torch.float32


def _apply_block(base_rows, delta_rows, target_dtype):
    """FastChat's sum for one block: rows the base lacks come from the delta alone. Inputs may
    already be in the compute dtype (read that way); they are then summed in place."""
    compute = _compute_dtype(str(delta_rows.dtype).removeprefix("torch."))
    total = delta_rows if delta_rows.dtype == compute else delta_rows.to(compute)
    if base_rows is not None and base_rows.shape[0]:
        total[: base_rows.shape[0]] += base_rows.to(compute)
    return total.to(target_dtype)


def _read_base_rows(base: Checkpoint, name: str, start: int, stop: int, dtype=None):
    info = base.tensors[name]
    if not info.shape:
        return base.read(name, dtype=dtype)
    if start >= info.shape[0]:
        return None
    return base.read(name, start, min(stop, info.shape[0]), dtype)


def _copy_model_files(out: Path, preferred: Path, fallback: Path) -> None:
    for name in MODEL_FILES:
        for directory in (preferred, fallback):
            if (directory / name).is_file():
                shutil.copyfile(directory / name, out / name)
                break


def _set_config(out: Path, plan: list[TensorInfo]) -> None:
    """config.json's vocab_size follows the embedding actually written."""
    path = out / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    embed = next((i for i in plan if i.name.endswith("embed_tokens.weight")), None)
    if embed is not None and config.get("vocab_size") != embed.shape[0]:
        config["vocab_size"] = embed.shape[0]
        path.write_text(json.dumps(config, indent=2))


def apply_delta(base_dir: str | Path, delta_dir: str | Path, out: str | Path,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress | None = None) -> list[str]:
    """Write base + delta into out (created if needed); returns the shard names written."""
    base_dir, delta_dir, out = Path(base_dir), Path(delta_dir), Path(out)
    with _weights(base_dir) as base, _weights(delta_dir) as delta:
        names = _check_pair(base, delta, "delta")
        wide = json.loads(delta.metadata.get(TARGET_DTYPES, "{}"))
        plan = [TensorInfo(n, wide.get(n, delta.tensors[n].dtype), delta.tensors[n].shape) for n in names]
        out.mkdir(parents=True, exist_ok=True)
        writer = ShardedWriter(out, plan, max_shard_bytes, progress=_start(progress, plan))
        for info in plan:
            compute = _compute_dtype(delta.tensors[info.name].dtype)
            for start, stop in row_blocks(info):
                rows = delta.read(info.name, start, stop, compute) if info.shape else delta.read(info.name, dtype=compute)
                writer.write(info.name, _apply_block(_read_base_rows(base, info.name, start, stop, compute), rows,
                                                     torch_dtype(info.dtype)))
        shards = writer.close()
    _copy_model_files(out, delta_dir, base_dir)
    _set_config(out, plan)
    return shards


def _bits(tensor):
    import torch

    return tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32 if tensor.element_size() == 4 else torch.int64)


def _delta_block(base_rows, target_rows, delta_dtype):
    import torch

    total = target_rows.to(_compute_dtype(str(delta_dtype).removeprefix("torch."))).clone()
    if base_rows is not None and base_rows.shape[0]:
        total[: base_rows.shape[0]] -= base_rows.to(total.dtype)
    delta = total.to(delta_dtype)
    exact = torch.equal(_bits(_apply_block(base_rows, delta.clone(), target_rows.dtype)), _bits(target_rows))
    return delta, exact


def make_delta(base_dir: str | Path, target_dir: str | Path, out: str | Path,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress | None = None) -> dict[str, str]:
    """Write target - base into out, so that apply_delta(base, out) == target bit for bit.

    Returns {tensor: dtype} for the tensors that had to be stored wider than their target."""
    base_dir, target_dir, out = Path(base_dir), Path(target_dir), Path(out)
    with _weights(base_dir) as base, _weights(target_dir) as target:
        names = _check_pair(base, target, "target")
        widened: dict[str, str] = {}
        # first pass: the narrowest dtype in which every block of a tensor round-trips exactly
        for name in names:
            info = target.tensors[name]
            for dtype in (info.dtype, "float32", "float64"):
                if torch_dtype(dtype).itemsize < torch_dtype(info.dtype).itemsize:
                    continue
                if all(_delta_block(_read_base_rows(base, name, start, stop),
                                    target.read(name, start, stop) if info.shape else target.read(name),
                                    torch_dtype(dtype))[1]
                       for start, stop in row_blocks(info)):
                    break
            else:
                raise DeltaError(f"tensor {name}: no delta dtype reproduces the target exactly")
            if dtype != info.dtype:
                widened[name] = dtype
        plan = [TensorInfo(n, widened.get(n, target.tensors[n].dtype), target.tensors[n].shape) for n in names]
        metadata = {TARGET_DTYPES: json.dumps({n: target.tensors[n].dtype for n in widened})} if widened else {}
        out.mkdir(parents=True, exist_ok=True)
        writer = ShardedWriter(out, plan, max_shard_bytes, metadata=metadata, progress=_start(progress, plan))
        for info in plan:
            for start, stop in row_blocks(info):
                rows = target.read(info.name, start, stop) if info.shape else target.read(info.name)
                delta, _ = _delta_block(_read_base_rows(base, info.name, start, stop), rows, torch_dtype(info.dtype))
                writer.write(info.name, delta)
        writer.close()
    _copy_model_files(out, target_dir, base_dir)
    return widened


# --- LoRA -------------------------------------------------------------------------------------

_UNSUPPORTED_LORA = {
    "use_dora": "DoRA adapters", "lora_bias": "LoRA bias terms", "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token indices", "use_qalora": "QA-LoRA",
}


def is_lora_adapter(directory: str | Path) -> bool:
    return (Path(directory) / "adapter_config.json").is_file()


def _lora_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DeltaError(f"{path}: not readable as JSON ({exc})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise DeltaError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, what in _UNSUPPORTED_LORA.items():
        if config.get(key):
            raise DeltaError(f"{path}: {key}: {what} cannot be merged by labtune (merge it with peft first)")
    if not isinstance(config.get("r"), int) or "lora_alpha" not in config:
        raise DeltaError(f"{path}: r and lora_alpha are required")
    return config


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?")


def _lora_updates(pairs: dict[str, dict[str, object]], replaced: dict[str, object], base: Any, config: dict[str, Any],
                  adapter_dir: Path) -> dict[str, tuple[object, object, float, bool]]:
    """{base weight: (A, B, scale, transposed)} for each LoRA pair, its shape checked against the base."""
    updates: dict[str, tuple[object, object, float, bool]] = {}
    for module, parts in pairs.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise DeltaError(f"{adapter_dir}: module {module} has only half of its LoRA pair")
        weight = f"{module}.weight"
        if weight not in base.tensors:
            raise DeltaError(f"{adapter_dir}: LoRA module {module} has no base tensor {weight} (wrong base?)")
        rank = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        transposed = embedding or bool(config.get("fan_in_fan_out"))
        delta_shape = (b.shape[0], a.shape[1])
        expected = replaced[weight].shape if weight in replaced else base.tensors[weight].shape
        if (delta_shape[::-1] if transposed else delta_shape) != tuple(expected):
            raise DeltaError(f"tensor {weight}: base shape {tuple(expected)} does not fit LoRA update "
                             f"{delta_shape[::-1] if transposed else delta_shape} (wrong base?)")
        updates[weight] = (a, b, scale, transposed)
    return updates


def merge_lora(base_dir: str | Path, adapter_dir: str | Path, out: str | Path,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress | None = None) -> dict[str, int]:
    """Fold a PEFT LoRA adapter into the base; returns counts of merged and replaced tensors."""
    import torch

    base_dir, adapter_dir, out = Path(base_dir), Path(adapter_dir), Path(out)
    config = _lora_config(adapter_dir)
    files = weight_files(adapter_dir, stem="adapter_model")
    if not files:
        raise DeltaError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")
    pairs: dict[str, dict[str, object]] = {}
    replaced: dict[str, object] = {}
    with Checkpoint(adapter_dir, files) as adapter:
        for key in adapter.tensors:
            name = key.removeprefix("base_model.model.")
            match = _LORA_KEY.fullmatch(name)
            if match:
                pairs.setdefault(match["module"], {})[match["kind"]] = adapter.read(key)
            else:
                replaced[name.replace(".base_layer.", ".")] = adapter.read(key)
    with _weights(base_dir) as base:
        updates = _lora_updates(pairs, replaced, base, config, adapter_dir)
        for name, tensor in replaced.items():
            if name not in base.tensors:
                raise DeltaError(f"{adapter_dir}: saved module weight {name} has no base tensor (wrong base?)")
            if tensor.shape[1:] != torch.Size(base.tensors[name].shape[1:]):
                raise DeltaError(f"tensor {name}: base shape {base.tensors[name].shape} does not fit adapter shape "
                                 f"{tuple(tensor.shape)} (wrong base?)")
        plan = []
        for name in _names(base):
            info = base.tensors[name]
            shape = tuple(replaced[name].shape) if name in replaced else info.shape
            plan.append(TensorInfo(name, info.dtype, shape))
        out.mkdir(parents=True, exist_ok=True)
        writer = ShardedWriter(out, plan, max_shard_bytes, progress=_start(progress, plan))
        for info in plan:
            for start, stop in row_blocks(info):
                if info.name in replaced:
                    rows = replaced[info.name][start:stop] if info.shape else replaced[info.name]
                else:
                    rows = base.read(info.name, start, stop) if info.shape else base.read(info.name)
                if info.name in updates:
                    a, b, scale, transposed = updates[info.name]
                    # PEFT's order of operations: (B @ A), transposed, times scale, added to W
                    if transposed:
                        update = (b.float() @ a.float()[:, start:stop]).T * scale
                    else:
                        update = (b.float()[start:stop] @ a.float()) * scale
                    rows = (rows.float() + update)
                writer.write(info.name, rows.to(torch_dtype(info.dtype)))
        writer.close()
    _copy_model_files(out, adapter_dir, base_dir)
    _set_config(out, plan)
    return {"merged": len(updates), "replaced": len(replaced)}


class TqdmProgress:
    """A byte progress bar on stderr, for the command line."""

    def __init__(self, label: str):
        self.label, self.bar = label, None

    def start(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=self.label, leave=False)

    def advance(self, done: int) -> None:
        self.bar.update(done)
        if self.bar.n >= self.bar.total:
            self.bar.close()


class LogProgress:
    """One log line per quarter of the output written, for task logs."""

    def __init__(self, log, label: str):
        self.log, self.label, self.total, self.done, self.next = log, label, 0, 0, 0.25

    def start(self, total: int) -> None:
        self.total = max(total, 1)
        self.log(f"{self.label}: writing {total / 1e9:.2f} GB")

    def advance(self, done: int) -> None:
        self.done += done
        while self.done / self.total >= self.next:
            self.log(f"{self.label}: {self.next:.0%} written")
            self.next += 0.25
