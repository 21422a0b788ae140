"""The finetune flow: weights -> delta -> data -> tokenize -> train -> evaluate, passing only store URIs.

    python flows/finetune.py examples/tiny.yaml train.num_train_epochs=2
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.train import train as train_flow
from labtune.recipe import Recipe, load_recipe
from labtune.stage import StageResult
from labtune.store import open_recipe_store, s3_options
from tasks import data as data_stage
from tasks import weights as weights_stage
from tasks.data import data_task
from tasks.delta import delta_task
from tasks.evaluate import evaluate_task
from tasks.tokenize import tokenize_task
from tasks.weights import weights_task


def preflight(recipe: Recipe) -> None:
    """Fail in seconds, with one line naming the thing, before any stage starts: the store is
    reachable, the base model and delta sources exist, every data source exists."""
    open_recipe_store(recipe).check()
    s3 = s3_options(recipe)
    for model in filter(None, (recipe.base_model, recipe.delta)):
        if not model.source.startswith("tiny://"):
            weights_stage.source_identity(model, s3)
    for source in recipe.data.sources:
        data_stage.source_identity(source, s3)


@flow(name="finetune", log_prints=True)
def finetune(recipe_path: str, overrides: list[str] | None = None) -> dict[str, dict]:
    """Fine-tune the recipe's base model on its data and evaluate it; returns each stage's
    {uri, cached, seconds}."""
    recipe = load_recipe(recipe_path, overrides or [])
    preflight(recipe)
    get_run_logger().info(f"recipe {recipe.name}: store {recipe.store.uri}")

    weights = weights_task(recipe)
    target = delta_task(recipe, weights.uri)
    data = data_task(recipe)
    tokens = tokenize_task(recipe, target.uri, data.uri)
    # a flow of its own, so that a deployment can run it on the GPU work pool
    trained = StageResult(**train_flow(recipe_path, target.uri, tokens.uri, overrides or []))
    evaluation = evaluate_task(recipe, target.uri, trained.uri, data.uri, tokens.uri)

    stages = {r.stage: r.to_dict() for r in (weights, target, data, tokens, trained, evaluation)}
    create_table_artifact(key="stages", table=[{"stage": name, **result} for name, result in stages.items()],
                          description=f"Recipe {recipe.name}: each stage's output in the store, and whether it was cached")
    return stages


if __name__ == "__main__":
    finetune(sys.argv[1], sys.argv[2:])
