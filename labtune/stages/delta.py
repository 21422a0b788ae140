"""Stage 2, delta: the target model = base + delta weights (Vicuna) or base + a LoRA adapter.

`delta.source` takes the same sources as the base model (a local directory, `s3://`, `hf://`).
A directory with `adapter_config.json` is a PEFT LoRA adapter and is merged as one; any other is a
FastChat-style delta (target = base + delta per tensor; the tokenizer comes from the delta).
Both merge tensor by tensor (see `labtune/models/merge.py`), so memory stays bounded by one block of
rows, not the model. With no delta in the recipe the base passes through and the stage does no work.
"""

from __future__ import annotations

from pathlib import Path

from labtune.models import merge, sources, tensorfiles
from labtune.models.merge import DeltaError, LogProgress, apply_delta, is_lora_adapter, merge_lora
from labtune.models.sources import local_source, model_identity, resolve_gguf
from labtune.models.tensorfiles import CheckpointError, check_model_folder
from labtune.recipe import Recipe
from labtune.store.backends import Store, StoreError
from labtune.store.outputs import Log, StageKey, StageResult, code_version, default_log, fetch, run_stage, stage_key

__all__ = ["DeltaError", "build_delta", "delta_key"]


def delta_key(recipe: Recipe, store: Store, weights_uri: str) -> StageKey:
    """Keyed by the weights output and the delta's identity (for a recipe that names a delta)."""
    if recipe.delta is None:
        raise ValueError("the recipe names no delta: its target is the weights output itself")
    if recipe.delta.source.startswith("tiny://") or resolve_gguf(recipe.delta) is not None:
        raise DeltaError(f"delta.source: {recipe.delta.source}: a delta must be a model directory, s3:// or hf:// "
                         "(safetensors or .bin deltas, or a PEFT LoRA adapter)")
    try:
        identity = model_identity(recipe.delta, recipe.store.settings())
    except StoreError as exc:
        raise DeltaError(f"delta.source: {exc}") from None
    inputs = {"weights": weights_uri, "delta": identity}
    return StageKey(stage_key("delta", code_version(__name__, merge, sources, tensorfiles), inputs, {}), inputs, {})


def build_delta(recipe: Recipe, store: Store, weights_uri: str, log: Log = default_log) -> StageResult:
    """The target model: the base itself when there is no delta, else base + delta (or adapter)."""
    if recipe.delta is None:
        log("delta: the recipe names no delta; the base model is the target")
        return StageResult("delta", weights_uri, True, 0.0)
    key = delta_key(recipe, store, weights_uri)

    def build(out: Path) -> dict:
        base_dir = fetch(store, weights_uri, log)
        with local_source(recipe.delta.source, recipe.store.settings(), log) as delta_dir:
            try:
                if is_lora_adapter(delta_dir):
                    log(f"merging LoRA adapter {recipe.delta.source} into {weights_uri}")
                    made = {"delta_kind": "lora", **merge_lora(base_dir, delta_dir, out, progress=LogProgress(log, "delta"))}
                else:
                    log(f"applying delta {recipe.delta.source} to {weights_uri}")
                    apply_delta(base_dir, delta_dir, out, progress=LogProgress(log, "delta"))
                    made = {"delta_kind": "delta"}
                check_model_folder(out)  # whole before the manifest calls it complete
                return made
            except CheckpointError as exc:
                raise DeltaError(str(exc)) from None

    return run_stage(store, "delta", key.key, build, inputs=key.inputs, parameters=key.parameters, log=log)
