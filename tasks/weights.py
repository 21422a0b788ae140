"""The weights stage as a Prefect task (stage logic: labtune/stages/weights.py)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from labtune.recipe import Recipe
from labtune.stages.weights import build_weights
from labtune.store.backends import Store
from labtune.store.outputs import StageResult
from tasks import retry_transient, run_log


@task(name="weights", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def weights_task(recipe: Recipe, store: Store) -> StageResult:
    with run_log() as logger:
        return build_weights(recipe, store, log=logger.info)
