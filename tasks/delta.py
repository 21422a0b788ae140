"""The delta stage as a Prefect task (stage logic: labtune/stages/delta.py)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from labtune.recipe import Recipe
from labtune.stages.delta import build_delta
from labtune.store.backends import Store
from labtune.store.outputs import StageResult
from tasks import retry_transient, run_log


@task(name="delta", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def delta_task(recipe: Recipe, store: Store, weights_uri: str) -> StageResult:
    with run_log() as logger:
        return build_delta(recipe, store, weights_uri, log=logger.info)
