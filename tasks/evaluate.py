"""The evaluate stage as a Prefect task, with the `evaluation` table and `evaluation-summary`
artifacts (stage logic: labtune/stages/evaluate.py)."""

from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from labtune import evaluation
from labtune.recipe import Recipe
from labtune.stage import StageResult
from labtune.stages.evaluate import COLUMNS, build_evaluate, read_evaluation, summary_markdown
from labtune.stages.train import progress_bar
from labtune.store import open_store
from tasks import retry_transient, run_log


ANSWER_CELL_CHARS = 90
MARKS = {True: "✓", False: "✗", None: "–"}


def answer_cell(row: dict, column: str) -> str:
    """'✓ answer' or '✗ answer' (– where unscored), cut to ANSWER_CELL_CHARS, '[cut]' where the
    token limit stopped it."""
    answer = row[f"{column}_answer"].replace("\n", " ")
    if len(answer) > ANSWER_CELL_CHARS:
        answer = answer[: ANSWER_CELL_CHARS - 1] + "…"
    return f"{MARKS[row[f'{column}_correct']]} {answer}" + (" [cut]" if row.get(f"{column}_truncated") else "")


@task(name="evaluate", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def evaluate_task(recipe: Recipe, base_uri: str, model_uri: str, data_uri: str | None = None,
                  tokens_uri: str | None = None) -> StageResult:
    store = open_store(recipe.store.settings())
    with run_log() as logger, progress_bar() as bar:
        def on_progress(record: dict) -> None:
            logger.info("progress " + json.dumps(record))
            bar(record)

        result = build_evaluate(recipe, store, base_uri, model_uri, log=logger.info, data_uri=data_uri,
                                tokens_uri=tokens_uri, on_progress=on_progress)
    summary, rows = read_evaluation(store, result.uri)
    columns = [(c, label) for c, label in COLUMNS if c in summary.get("columns", ["base", "tuned"])]
    create_table_artifact(
        key="evaluation",
        # seven columns, each answer marked right or wrong, fit a 1400 px page; answers.jsonl has them whole
        table=[{"question": r["question"], "tags": ", ".join(r.get("tags", [])), "expected": evaluation.expected_text(r),
                **{f"{label} answer": answer_cell(r, c) for c, label in columns}} for r in rows],
        description=(f"Recipe {recipe.name}: base {summary['base_correct']}/{summary['total']}, "
                     f"fine-tuned {summary['tuned_correct']}/{summary['total']} correct; answers cut at "
                     f"max_new_tokens={summary['max_new_tokens']}: fine-tuned {summary['truncated']['tuned']}. {result.uri}"),
    )
    create_markdown_artifact(key="evaluation-summary", markdown=summary_markdown(summary, result.uri),
                             description="Accuracy per tag, eval-split perplexity and retention, base vs fine-tuned")
    return result
