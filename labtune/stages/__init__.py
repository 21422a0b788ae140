"""The stages, Prefect-free: weights -> delta (-> replay) -> data (-> synthesize) -> tokenize -> train -> evaluate (-> export).

Each module holds its stage's `build_<stage>` function (key, inputs, the work, the report);
`tasks/` wraps each in a Prefect task. `GRAPH` below is the one description of how they chain:
the finetune flow, `run_until` (the command line's one-stage commands, the benchmarks) and remote
dispatch to a deployment all read it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from labtune.recipe import Recipe
from labtune.store.backends import Store
from labtune.store.outputs import Log, StageResult, default_log, output_prefix, require_output


@dataclass(frozen=True)
class Stage:
    """A stage: its name (its module in labtune.stages, its `build_<name>`) and its inputs, each
    an upstream stage and the builder's parameter that takes that stage's output URI."""

    name: str
    inputs: tuple[tuple[str, str], ...] = ()
    reports_progress: bool = False
    wanted: Callable[[Recipe], bool] = lambda recipe: True  # a run leaves out a stage its recipe does not ask for

    def builder(self) -> Callable[..., StageResult]:
        return getattr(importlib.import_module(f"labtune.stages.{self.name}"), f"build_{self.name}")


GRAPH = (
    Stage("weights"),
    Stage("delta", (("weights", "base_uri"),)),
    Stage("replay", (("delta", "model_uri"),), wanted=lambda recipe: recipe.data.replay.enabled),
    Stage("data"),
    Stage("synthesize", (("delta", "model_uri"), ("data", "data_uri")), wanted=lambda recipe: recipe.data.synthesize.enabled),
    Stage("tokenize", (("delta", "model_uri"), ("data", "data_uri"), ("replay", "replay_uri"),
                       ("synthesize", "synthesize_uri"))),
    Stage("train", (("delta", "model_uri"), ("tokenize", "tokens_uri")), reports_progress=True),
    Stage("evaluate", (("delta", "base_uri"), ("train", "model_uri"), ("data", "data_uri"), ("tokenize", "tokens_uri")),
          reports_progress=True),
    Stage("export", (("train", "model_uri"), ("evaluate", "evaluate_uri")), wanted=lambda recipe: recipe.export.gguf is not None),
)
STAGES = tuple(stage.name for stage in GRAPH)
BY_NAME = {stage.name: stage for stage in GRAPH}


def input_uris(stage: str, outputs: dict[str, str]) -> dict[str, str]:
    """The builder's URI arguments for `stage`, from the output URIs of the stages before it (an
    input from a stage the recipe leaves out, such as replay, is left out)."""
    return {parameter: outputs[upstream] for upstream, parameter in BY_NAME[stage].inputs if upstream in outputs}


def output_uri(stage: str, recipe: Recipe, store: Store, uris: dict[str, str]) -> str:
    """Where `stage`'s output is or will be, from its key (for train and evaluate, the stages a
    deployment may run elsewhere: the flow waits for that URI's manifest)."""
    module = importlib.import_module(f"labtune.stages.{stage}")
    key = getattr(module, f"{stage}_key")(recipe, **uris)[0]
    return store.uri_for(output_prefix(stage, key))


def run_until(stage: str, recipe: Recipe, store: Store, given: dict[str, str] | None = None, log: Log = default_log,
              on_progress: Callable[[dict], None] | None = None) -> StageResult:
    """Run `stage` and whatever it needs before it (cached stages cost a manifest read). `given`
    maps an upstream stage (`weights`, `delta`, `data`, `tokenize`, `train`) to an output URI that
    is used instead of computing that stage."""
    if stage not in BY_NAME:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    outputs = {k: v for k, v in (given or {}).items() if v}
    for upstream, uri in outputs.items():  # a wrong --base or --tokens is named before anything runs
        require_output(store, uri, upstream)
    done: dict[str, StageResult] = {}

    def build(name: str) -> StageResult:
        spec = BY_NAME[name]
        for upstream, _ in spec.inputs:
            if upstream not in outputs and BY_NAME[upstream].wanted(recipe):
                done[upstream] = build(upstream)
                outputs[upstream] = done[upstream].uri
        extra = {"on_progress": on_progress} if spec.reports_progress else {}
        return spec.builder()(recipe, store, log=log, **input_uris(name, outputs), **extra)

    return build(stage)
