"""The finetune flow: weights -> delta -> data -> train -> evaluate, passing only store URIs.

    python flows/finetune.py examples/tiny.yaml train.num_train_epochs=2
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger

from labtune.recipe import load_recipe
from labtune.store import open_recipe_store
from tasks.data import data_task
from tasks.delta import delta_task
from tasks.evaluate import evaluate_task
from tasks.train import train_task
from tasks.weights import weights_task


@flow(name="finetune", log_prints=True)
def finetune(recipe_path: str, overrides: list[str] | None = None) -> dict[str, dict]:
    """Fine-tune the recipe's base model on its data and evaluate it; returns each stage's
    {uri, cached, seconds}."""
    recipe = load_recipe(recipe_path, overrides or [])
    open_recipe_store(recipe).check()
    get_run_logger().info(f"recipe {recipe.name}: store {recipe.store.uri}")

    weights = weights_task(recipe)
    target = delta_task(recipe, weights.uri)
    data = data_task(recipe)
    trained = train_task(recipe, target.uri, data.uri)
    evaluation = evaluate_task(recipe, target.uri, trained.uri)

    return {r.stage: r.to_dict() for r in (weights, target, data, trained, evaluation)}


if __name__ == "__main__":
    finetune(sys.argv[1], sys.argv[2:])
