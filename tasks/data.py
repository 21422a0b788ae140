"""The data stage as a Prefect task, with the `data-report` artifact (stage logic:
labtune/stages/data.py)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from labtune.recipe import Recipe
from labtune.stages.data import build_data, report_markdown
from labtune.store.backends import Store
from labtune.store.outputs import StageResult
from tasks import retry_transient, run_log


@task(name="data", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def data_task(recipe: Recipe, store: Store) -> StageResult:
    with run_log() as logger:
        result = build_data(recipe, store, log=logger.info)
    manifest = result.manifest or {}
    create_markdown_artifact(key="data-report", markdown=report_markdown(manifest.get("report", []), result.uri,
                                                                       manifest.get("facts")),
                             description=f"Data mix for recipe {recipe.name}: records per source, kept and dropped")
    return result
