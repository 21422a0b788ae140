"""The synthesize stage as a Prefect task, with the `synthesize` artifact: the generator's
question-answer pairs about the notes that join training (stage logic: labtune/stages/synthesize.py)."""

from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from labtune.recipe import Recipe
from labtune.stages.synthesize import build_synthesize, synthesize_markdown
from labtune.store.backends import Store
from labtune.store.outputs import StageResult, fetch
from tasks import retry_transient, run_log


@task(name="synthesize", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def synthesize_task(recipe: Recipe, store: Store, target_uri: str, data_uri: str) -> StageResult:
    with run_log() as logger:
        result = build_synthesize(recipe, store, target_uri, data_uri, log=logger.info)
    folder = fetch(store, result.uri)
    create_markdown_artifact(key="synthesize", markdown=synthesize_markdown(
        json.loads((folder / "report.json").read_text()), json.loads((folder / "synthesize.json").read_text()), result.uri),
        description=f"Recipe {recipe.name}: model-written question-answer pairs about the notes, faithful ones only")
    return result
