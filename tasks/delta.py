"""Stage 2, delta: target = base + delta, tensor by tensor (FastChat's `apply_delta`).

Vicuna was released as deltas on LLaMA: each target tensor is the base tensor plus the delta
tensor, and the tokenizer comes from the delta. Rows beyond the base vocabulary (Vicuna v0 added
a pad token) come from the delta alone. Sums of fp16/bf16 tensors are computed in fp32. With no
delta in the recipe, the base model passes through unchanged and the stage does no work.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from labtune.errors import LabtuneError, retry_transient
from labtune.recipe import Recipe
from labtune.stage import Log, StageResult, code_version, default_log, fetch, run_stage, stage_key
from labtune.store import Store, open_recipe_store, s3_options
from tasks.weights import HF_FILES, materialize, source_identity


class DeltaError(LabtuneError):
    """The delta does not fit the base; the message names the tensor and both shapes."""


def _load_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    if not tensors:
        raise DeltaError(f"{directory}: no safetensors weights found")
    return tensors


def apply_delta(base_dir: Path, delta_dir: Path, out: Path) -> None:
    """Write base + delta into out; every shape is checked before anything is written."""
    import torch
    from safetensors.torch import save_file

    base, delta = _load_tensors(base_dir), _load_tensors(delta_dir)
    missing = sorted(set(delta) - set(base))
    if missing:
        raise DeltaError(f"delta tensor {missing[0]} has no counterpart in the base model (wrong base?)")
    for name, d in delta.items():
        b = base[name]
        grows_vocab = d.dim() == b.dim() and d.shape[0] > b.shape[0] and d.shape[1:] == b.shape[1:]
        if d.shape != b.shape and not grows_vocab:
            raise DeltaError(f"tensor {name}: base shape {tuple(b.shape)} does not fit delta shape {tuple(d.shape)} (wrong base?)")
    target = {}
    for name, d in delta.items():
        b = base[name]
        summed = d.to(torch.float32).clone()
        summed[: b.shape[0]] += b.to(torch.float32)
        target[name] = summed.to(d.dtype).contiguous()
    save_file(target, out / "model.safetensors", metadata={"format": "pt"})
    for name in HF_FILES:
        source = delta_dir / name if (delta_dir / name).is_file() else base_dir / name
        if source.is_file():
            shutil.copyfile(source, out / name)
    config = json.loads((out / "config.json").read_text())
    embed = next((t for n, t in target.items() if n.endswith("embed_tokens.weight")), None)
    if embed is not None and config.get("vocab_size") != embed.shape[0]:
        config["vocab_size"] = embed.shape[0]
        (out / "config.json").write_text(json.dumps(config, indent=2))


def build_delta(recipe: Recipe, store: Store, base_uri: str, log: Log = default_log) -> StageResult:
    """The target model: the base itself when there is no delta, else base + delta."""
    if recipe.delta is None:
        log("delta: the recipe names no delta; the base model is the target")
        return StageResult("delta", base_uri, True, 0.0)
    identity = source_identity(recipe.delta, s3_options(recipe))
    key = stage_key("delta", code_version(__file__), {"base": base_uri, "delta": identity}, {})

    def build(out: Path) -> None:
        base_dir = fetch(store, base_uri, log)
        delta_dir = out.parent / "delta"
        delta_dir.mkdir()
        materialize(recipe.delta, delta_dir, s3_options(recipe), log)
        log(f"applying delta {recipe.delta.source} to {base_uri}")
        apply_delta(base_dir, delta_dir, out)

    return run_stage(store, "delta", key, build, inputs={"base": base_uri, "delta": identity},
                     parameters={}, log=log)


@task(name="delta", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def delta_task(recipe: Recipe, base_uri: str) -> StageResult:
    return build_delta(recipe, open_recipe_store(recipe), base_uri, log=get_run_logger().info)
