"""The replay stage as a Prefect task, with the `replay` artifact: the base model's own answers to
general prompts that join training (stage logic: labtune/stages/replay.py)."""

from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from labtune.recipe import Recipe
from labtune.stages.replay import build_replay, replay_markdown
from labtune.store.backends import Store
from labtune.store.outputs import StageResult, fetch
from tasks import retry_transient, run_log


@task(name="replay", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def replay_task(recipe: Recipe, store: Store, target_uri: str) -> StageResult:
    with run_log() as logger:
        result = build_replay(recipe, store, target_uri, log=logger.info)
    folder = fetch(store, result.uri)
    create_markdown_artifact(key="replay", markdown=replay_markdown(json.loads((folder / "report.json").read_text()),
                                                                     json.loads((folder / "replay.json").read_text()),
                                                                     result.uri),
                             description=f"Recipe {recipe.name}: the base model's own answers mixed into training")
    return result
