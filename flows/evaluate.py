"""The evaluate flow: one stage, on its own so a deployment can send it to the GPU work pool.

    python flows/evaluate.py examples/tiny.yaml TARGET_URI TUNED_URI DATA_URI TOKENS_URI [key=value ...]
"""

from __future__ import annotations

import sys

from prefect import flow

from labtune.recipe import load_recipe
from tasks.evaluate import evaluate_task


@flow(name="evaluate", log_prints=True)
def evaluate(recipe_path: str, target_uri: str, tuned_uri: str, data_uri: str | None = None, tokens_uri: str | None = None,
             overrides: list[str] | None = None) -> dict:
    """Ask the base and the fine-tuned model the recipe's prompts; returns {stage, uri, cached, seconds}."""
    recipe = load_recipe(recipe_path, overrides or [])
    return evaluate_task(recipe, recipe.store.open(), target_uri, tuned_uri, data_uri, tokens_uri).to_dict()


if __name__ == "__main__":
    evaluate(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])
