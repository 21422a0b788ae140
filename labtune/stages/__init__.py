"""The stages, Prefect-free: weights -> delta (-> replay) -> data (-> synthesize) -> tokenize -> train -> evaluate (-> export).

Each module holds its stage's `<stage>_key` (its output's key, inputs and parameters) and
`build_<stage>` (the work and the report); a stage's output is named after it: weights, target
(delta: the model to fine-tune), data, replay, synthesize, tokens, tuned (train), evaluation, export.
`tasks/` wraps each in a Prefect task. `GRAPH` below is the one description of how they chain:
the finetune flow, `run_until` (the command line's one-stage commands, the benchmarks) and remote
dispatch to a deployment all read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from labtune.recipe import Recipe
from labtune.stages.data import build_data, data_key
from labtune.stages.delta import build_delta, delta_key
from labtune.stages.evaluate import build_evaluate, evaluate_key
from labtune.stages.export import build_export, export_key
from labtune.stages.replay import build_replay, replay_key
from labtune.stages.synthesize import build_synthesize, synthesize_key
from labtune.stages.tokenize import build_tokenize, tokenize_key
from labtune.stages.train import build_train, train_key
from labtune.stages.weights import build_weights, weights_key
from labtune.store.backends import Store
from labtune.store.outputs import Log, StageKey, StageResult, default_log, output_prefix, require_output


@dataclass(frozen=True)
class Stage:
    """A stage: its name, what its output is called (a builder takes it as `<output>_uri`), its
    builder `build(recipe, store, **input URIs)` and key function `key(recipe, store, **input URIs)`,
    and the upstream stages whose outputs it takes."""

    name: str
    output: str
    build: Callable[..., StageResult]
    key: Callable[..., StageKey]
    inputs: tuple[str, ...] = ()
    reports_progress: bool = False
    wanted: Callable[[Recipe], bool] = lambda recipe: True  # a run leaves out a stage its recipe does not ask for

    @property
    def parameter(self) -> str:
        """The name a downstream builder gives this stage's output URI."""
        return f"{self.output}_uri"


GRAPH = (
    Stage("weights", "weights", build_weights, weights_key),
    Stage("delta", "target", build_delta, delta_key, ("weights",)),
    Stage("replay", "replay", build_replay, replay_key, ("delta",), wanted=lambda recipe: recipe.data.replay.enabled),
    Stage("data", "data", build_data, data_key),
    Stage("synthesize", "synthesize", build_synthesize, synthesize_key, ("delta", "data"),
          wanted=lambda recipe: recipe.data.synthesize.enabled),
    Stage("tokenize", "tokens", build_tokenize, tokenize_key, ("delta", "data", "replay", "synthesize")),
    Stage("train", "tuned", build_train, train_key, ("delta", "tokenize"), reports_progress=True),
    Stage("evaluate", "evaluation", build_evaluate, evaluate_key, ("delta", "train", "data", "tokenize"),
          reports_progress=True),
    Stage("export", "export", build_export, export_key, ("train", "evaluate"),
          wanted=lambda recipe: recipe.export.gguf is not None),
)
STAGES = tuple(stage.name for stage in GRAPH)
BY_NAME = {stage.name: stage for stage in GRAPH}


def input_uris(stage: str, outputs: dict[str, str]) -> dict[str, str]:
    """The builder's URI arguments for `stage`, from the output URIs of the stages before it (an
    input from a stage the recipe leaves out, such as replay, is left out)."""
    return {BY_NAME[upstream].parameter: outputs[upstream] for upstream in BY_NAME[stage].inputs if upstream in outputs}


def output_uri(stage: str, recipe: Recipe, store: Store, uris: dict[str, str]) -> str:
    """Where `stage`'s output is or will be, from its key (for the stages a deployment may run
    elsewhere: the flow waits for that URI's manifest)."""
    return store.uri_for(output_prefix(stage, BY_NAME[stage].key(recipe, store, **uris).key))


def run_until(stage: str, recipe: Recipe, store: Store, given: dict[str, str] | None = None, log: Log = default_log,
              on_progress: Callable[[dict], None] | None = None) -> StageResult:
    """Run `stage` and whatever it needs before it (cached stages cost a manifest read). `given`
    maps an upstream stage (`weights`, `delta`, `data`, `tokenize`, `train`) to an output URI that
    is used instead of computing that stage."""
    if stage not in BY_NAME:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    outputs = {k: v for k, v in (given or {}).items() if v}
    for upstream, uri in outputs.items():  # a wrong --target or --tokens is named before anything runs
        require_output(store, uri, upstream)
    done: dict[str, StageResult] = {}

    def build(name: str) -> StageResult:
        spec = BY_NAME[name]
        for upstream in spec.inputs:
            if upstream not in outputs and BY_NAME[upstream].wanted(recipe):
                done[upstream] = build(upstream)
                outputs[upstream] = done[upstream].uri
        extra = {"on_progress": on_progress} if spec.reports_progress else {}
        return spec.build(recipe, store, log=log, **input_uris(name, outputs), **extra)

    return build(stage)
