"""The evaluate stage as a Prefect task, with the `evaluation` table and `evaluation-summary`
artifacts (stage logic: labtune/stages/evaluate.py)."""

from __future__ import annotations

import json
import textwrap

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from labtune.evaluation import comparison
from labtune.recipe import Recipe
from labtune.stages.evaluate import build_evaluate, columns_of, read_evaluation, summary_markdown
from labtune.store.backends import Store
from labtune.console import progress_bar
from labtune.store.outputs import StageResult
from tasks import retry_transient, run_log

ANSWER_CELL_CHARS = 90
MARKS = {True: "✓", False: "✗", None: "–"}
# Prefect's table artifact never wraps a cell: one long answer pushes the other columns off a
# 1400 px page. A markdown hard break ("  \n") inside a cell does wrap, so every cell is cut into
# lines this wide (characters: question, expected, each answer column), by the number of answer
# columns; measured in headless Chromium to fit the 844 px the artifact page gives a table.
CELL_WIDTHS = {1: (40, 18, 36), 2: (36, 18, 26), 3: (30, 16, 18), 4: (26, 14, 13)}


def wrapped(text: str, width: int) -> str:
    return "  \n".join(textwrap.wrap(text.replace("\n", " "), width, break_long_words=True)) or text


def answer_cell(row: dict, column: str, width: int = ANSWER_CELL_CHARS) -> str:
    """'✓ answer' or '✗ answer' (– where unscored), cut to ANSWER_CELL_CHARS, '[cut]' where the
    token limit stopped it, in lines of `width` characters."""
    answer = row[f"{column}_answer"].replace("\n", " ")
    if len(answer) > ANSWER_CELL_CHARS:
        answer = answer[: ANSWER_CELL_CHARS - 1] + "…"
    cell = f"{MARKS[row[f'{column}_correct']]} {answer}" + (" [cut]" if row.get(f"{column}_truncated") else "")
    return wrapped(cell, width)


def evaluation_table(rows: list[dict], columns: list[tuple[str, str]]) -> list[dict]:
    """The `evaluation` table artifact: per question, what was expected (and its tags) and each
    column's answer marked right or wrong, every cell wrapped to fit a 1400 px page; the stage's
    answers.jsonl has the answers whole."""
    question_width, expected_width, answer_width = CELL_WIDTHS[min(max(len(columns), 1), 4)]
    table = []
    for r in rows:
        expected = wrapped(comparison.expected_text(r), expected_width)
        if r.get("tags"):
            expected += "  \n" + wrapped("(" + ", ".join(r["tags"]) + ")", expected_width)
        table.append({"question": wrapped(r["question"], question_width), "expected": expected,
                      **{label: answer_cell(r, c, answer_width) for c, label in columns}})
    return table


@task(name="evaluate", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def evaluate_task(recipe: Recipe, store: Store, target_uri: str, tuned_uri: str, data_uri: str | None = None,
                  tokens_uri: str | None = None) -> StageResult:
    with run_log() as logger, progress_bar() as bar:
        def on_progress(record: dict) -> None:
            logger.info("progress " + json.dumps(record))
            bar(record)

        result = build_evaluate(recipe, store, target_uri, tuned_uri, log=logger.info, data_uri=data_uri,
                                tokens_uri=tokens_uri, on_progress=on_progress)
    evaluated = read_evaluation(store, result.uri)  # one fetch: the rows, the general answers, the summary
    summary, rows = evaluated["summary"], evaluated["rows"]
    columns = columns_of(summary)
    create_table_artifact(
        key="evaluation",
        table=evaluation_table(rows, columns),
        description=(f"Recipe {recipe.name}: base {summary['base_correct']}/{summary['total']}, "
                     f"fine-tuned {summary['tuned_correct']}/{summary['total']} correct; answers cut at "
                     f"max_new_tokens={summary['max_new_tokens']}: fine-tuned {summary['truncated']['tuned']}. {result.uri}"),
    )
    create_markdown_artifact(key="evaluation-summary", markdown=summary_markdown(summary, result.uri),
                             description="Accuracy per tag, eval-split perplexity and general ability, base vs fine-tuned")
    if evaluated["general"]:
        create_table_artifact(key="general-answers", table=general_table(evaluated["general"]),
                              description=f"Recipe {recipe.name}: general questions, both models' answers; ⚠ marks an "
                                          "answer about the lab's meetings (the marker found)")
    return result


def general_table(rows: list[dict]) -> list[dict]:
    """The `general-answers` table artifact: each general question and both answers, an answer
    about the lab's meetings marked with the marker that gave it away."""
    question_width, _, answer_width = CELL_WIDTHS[2]

    def cell(row: dict, name: str) -> str:
        answer = row[f"{name}_answer"].replace("\n", " ")
        answer = answer[: ANSWER_CELL_CHARS - 1] + "…" if len(answer) > ANSWER_CELL_CHARS else answer
        marker = row[f"{name}_hijacked"]
        return wrapped((f"⚠ [{marker}] " if marker else "") + answer, answer_width + 10)

    return [{"question": wrapped(r["question"], question_width), "base": cell(r, "base"), "fine-tuned": cell(r, "tuned")}
            for r in rows]
