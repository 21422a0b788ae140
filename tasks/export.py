"""The export stage as a Prefect task (stage logic: labtune/stages/export.py)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from labtune.recipe import Recipe
from labtune.stages.export import build_export
from labtune.store.backends import Store
from labtune.store.outputs import StageResult
from tasks import retry_transient, run_log


@task(name="export", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def export_task(recipe: Recipe, store: Store, tuned_uri: str, evaluation_uri: str) -> StageResult:
    with run_log() as logger:
        result = build_export(recipe, store, tuned_uri, evaluation_uri, log=logger.info)
        name = f"{recipe.export.name or recipe.name}-{recipe.export.gguf}.gguf"
        create_markdown_artifact(key="export", description="The model as GGUF, for llama.cpp and Ollama", markdown=(
            f"# Export\n\n`{result.uri}/{name}` with `Modelfile` and `README.md` (the model card).\n\n"
            f"```\nlabtune store ls  # or copy the folder, then:\nollama create {recipe.export.name or recipe.name} "
            f"-f Modelfile\nllama-cli -m {name} -cnv\n```\n"))
        return result
