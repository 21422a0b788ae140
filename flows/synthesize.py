"""The synthesize flow: one stage, on its own so a deployment can send the generator to the GPU work pool.

    python flows/synthesize.py examples/tiny.yaml TARGET_URI DATA_URI [key=value ...]
"""

from __future__ import annotations

import sys

from prefect import flow

from labtune.recipe import load_recipe
from tasks.synthesize import synthesize_task


@flow(name="synthesize", log_prints=True)
def synthesize(recipe_path: str, target_uri: str, data_uri: str, overrides: list[str] | None = None) -> dict:
    """The generator's question-answer pairs about each note; returns {stage, uri, cached, seconds}."""
    recipe = load_recipe(recipe_path, overrides or [])
    return synthesize_task(recipe, recipe.store.open(), target_uri, data_uri).to_dict()


if __name__ == "__main__":
    synthesize(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
