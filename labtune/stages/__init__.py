"""The six stages, Prefect-free: weights -> delta -> data -> tokenize -> train -> evaluate.

Each module holds its stage's `build_*` function (key, inputs, the work, the report); `tasks/`
wraps each in a Prefect task and `flows/finetune.py` chains them. `run_until` chains them here
without Prefect, for the command line's one-stage commands and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable

from labtune.recipe import Recipe
from labtune.store.outputs import Log, StageResult, default_log
from labtune.store.backends import Store

STAGES = ("weights", "delta", "data", "tokenize", "train", "evaluate")


def run_until(stage: str, recipe: Recipe, store: Store, given: dict[str, str] | None = None, log: Log = default_log,
              on_progress: Callable[[dict], None] | None = None) -> StageResult:
    """Run `stage` and whatever it needs before it (cached stages cost a manifest read). `given`
    maps an upstream stage (`weights`, `delta`, `data`, `tokenize`, `train`) to an output URI that
    is used instead of computing that stage."""
    from labtune.stages.data import build_data
    from labtune.stages.delta import build_delta
    from labtune.stages.evaluate import build_evaluate
    from labtune.stages.tokenize import build_tokenize
    from labtune.stages.train import build_train
    from labtune.stages.weights import build_weights

    given = {k: v for k, v in (given or {}).items() if v}
    done: dict[str, StageResult] = {}

    def uri(name: str) -> str:
        if name in given:
            return given[name]
        if name not in done:
            done[name] = build(name)
        return done[name].uri

    def build(name: str) -> StageResult:
        if name == "weights":
            return build_weights(recipe, store, log)
        if name == "delta":
            return build_delta(recipe, store, uri("weights"), log)
        if name == "data":
            return build_data(recipe, store, log)
        if name == "tokenize":
            return build_tokenize(recipe, store, uri("delta"), uri("data"), log)
        if name == "train":
            return build_train(recipe, store, uri("delta"), uri("tokenize"), log, on_progress=on_progress)
        return build_evaluate(recipe, store, uri("delta"), uri("train"), log, data_uri=uri("data"),
                              tokens_uri=uri("tokenize"), on_progress=on_progress)

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return build(stage)
