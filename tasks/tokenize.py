"""The tokenize stage as a Prefect task, with the `token-report` artifact (stage logic:
labtune/stages/tokenize.py)."""

from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from labtune.recipe import Recipe
from labtune.stages.tokenize import build_tokenize, report_markdown
from labtune.store.backends import Store
from labtune.store.outputs import StageResult
from tasks import retry_transient, run_log


@task(name="tokenize", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def tokenize_task(recipe: Recipe, store: Store, target_uri: str, data_uri: str, replay_uri: str | None = None,
                  synthesize_uri: str | None = None) -> StageResult:
    with run_log() as logger:
        result = build_tokenize(recipe, store, target_uri, data_uri, log=logger.info, replay_uri=replay_uri,
                                synthesize_uri=synthesize_uri)
    # report.json, not the manifest's report: only the file keeps the length histograms
    report = json.loads(store.read_bytes(f"{store.key_for(result.uri)}/report.json"))
    create_markdown_artifact(key="token-report", markdown=report_markdown(report, result.uri),
                             description=f"Tokenized data for recipe {recipe.name}: examples, splits, token lengths")
    return result
