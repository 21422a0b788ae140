"""The train flow: one stage, on its own so a deployment can send it to the GPU work pool.

    python flows/train.py examples/tiny.yaml TARGET_URI TOKENS_URI [key=value ...]

TARGET_URI and TOKENS_URI are the delta (or weights) and tokenize stages' outputs in the store;
the finetune flow calls this flow with them. A crashed attempt is retried and resumes from the
newest checkpoint in the store.
"""

from __future__ import annotations

import sys

from prefect import flow

from labtune.recipe import load_recipe
from tasks.train import train_task


@flow(name="train", log_prints=True)
def train(recipe_path: str, target_uri: str, tokens_uri: str, overrides: list[str] | None = None) -> dict:
    """Fine-tune the model at target_uri on the tokenized data at tokens_uri; returns the stage's
    {stage, uri, cached, seconds}."""
    recipe = load_recipe(recipe_path, overrides or [])
    return train_task(recipe, recipe.store.open(), target_uri, tokens_uri).to_dict()


if __name__ == "__main__":
    train(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
