"""The sweep flow: one recipe, a grid of overrides, every variant fine-tuned and evaluated (stages
they share are cached, so they run once), then one comparison table, question by question.

    python flows/sweep.py examples/tiny.yaml '{"train.num_train_epochs": [1, 2]}' [key=value ...]
"""

from __future__ import annotations

import json
import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.finetune import finetune
from labtune.evaluation import comparison
from labtune.overrides import grid_variants
from labtune.recipe import load_recipe
from labtune.stages.evaluate import read_evaluation


@flow(name="sweep", log_prints=True)
def sweep(recipe_path: str, grid: dict[str, list[Any]], overrides: list[str] | None = None) -> dict[str, Any]:
    """Run finetune for each variant of the grid (e.g. {"data.sources.1.weight": [0, 1],
    "train.num_train_epochs": [3, 50]}) and compare their evaluations."""
    logger = get_run_logger()
    runs = []
    for variant in grid_variants(grid):
        variant_overrides = list(overrides or []) + [f"{key}={value}" for key, value in variant.items()]
        logger.info(f"sweep: variant {variant}")
        recipe = load_recipe(recipe_path, variant_overrides)
        stages = finetune(recipe_path, variant_overrides)
        run = read_evaluation(recipe.store.open(), stages["evaluate"]["uri"])
        runs.append({**run, "variant": variant})
    labels, table = comparison.comparison_table(runs)
    columns = ["question", "expected", "base", *labels]
    markdown = comparison.markdown_table(columns, table)
    totals = [f"- {label}: {run['summary']['tuned_correct']}/{run['summary']['total']} correct (`{run['uri']}`)"
              for label, run in zip(labels, runs)]
    create_table_artifact(key="comparison", table=[{c: row.get(c) for c in columns} for row in table],
                          description=f"Sweep over {list(grid)}: each variant's fine-tuned answers, question by question")
    create_markdown_artifact(key="comparison-summary", markdown="\n".join(["# Sweep", "", *totals]),
                             description="Correct answers per variant")
    return {"columns": labels, "rows": table, "runs": [{"variant": r["variant"], "uri": r["uri"],
                                                       "tuned_correct": r["summary"]["tuned_correct"],
                                                       "total": r["summary"]["total"]} for r in runs],
            "markdown": markdown + "\n\n" + "\n".join(totals)}


if __name__ == "__main__":
    sweep(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:])
