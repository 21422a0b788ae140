"""The finetune flow: weights -> delta (-> replay) -> data (-> synthesize) -> tokenize -> train -> evaluate (-> export), passing only store URIs.

    python flows/finetune.py examples/tiny.yaml train.num_train_epochs=2
"""

from __future__ import annotations

import sys
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.deployments import run_deployment
from prefect.runtime import deployment, flow_run
from prefect.states import Failed

from flows.train import train as train_flow
from flows.watch import changes_markdown
from labtune.errors import RunFailure, one_line
from labtune.recipe import Recipe, load_recipe
from labtune.stages import GRAPH, input_uris, output_uri
from labtune.stages.preflight import preflight
from labtune.store.housekeeping import record_run, usage_markdown
from labtune.store.outputs import StageResult, read_manifest
from tasks.data import data_task
from tasks.delta import delta_task
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.replay import replay_task
from tasks.synthesize import synthesize_task
from tasks.tokenize import tokenize_task
from tasks.weights import weights_task


def remote_stage(deployment: str, stage: str, parameters: dict[str, Any], uri: str, store) -> StageResult:
    """Run a stage's flow through its deployment (another work pool) and wait; the output is known
    by its content-addressed URI, which must hold a manifest afterwards."""
    started = time.time()
    run = run_deployment(deployment, parameters=parameters, timeout=None)
    if not run.state or not run.state.is_completed():
        ended = f"{run.state.name}: {(run.state.message or '').strip()}" if run.state else "without a state"
        raise RunFailure(f"{stage}: deployment {deployment} run {run.name} ended {ended.rstrip(': ')}; a re-run "
                           f"skips the finished stages" + (" and resumes training from its last checkpoint"
                                                           if stage == "train" else ""))
    if read_manifest(store, store.key_for(uri)) is None:
        raise RunFailure(f"{stage}: deployment {deployment} run {run.name} completed but {uri} has no manifest")
    return StageResult(stage, uri, False, round(time.time() - started, 3))


def run_for_same_notes(recipe_path: str, overrides: list[str], fingerprint: str) -> str | None:
    """The name of another finetune run, running or completed, for the same recipe, overrides and
    notes fingerprint: at most one training per fingerprint and recipe."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.runtime import flow_run

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["finetune"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.RUNNING, StateType.COMPLETED]))), limit=200)
    for run in runs:
        same = (run.parameters.get("notes_fingerprint") == fingerprint and run.parameters.get("recipe_path") == recipe_path
                and list(run.parameters.get("overrides") or []) == list(overrides))
        if same and str(run.id) != str(flow_run.id):
            return run.name
    return None


@flow(name="finetune", log_prints=True)
def finetune(recipe_path: str, overrides: list[str] | None = None, notes_fingerprint: str | None = None,
             notes_changes: dict[str, Any] | None = None) -> dict[str, dict]:
    """Fine-tune the recipe's base model on its data and evaluate it; returns each stage's
    {uri, cached, seconds}. notes_fingerprint and notes_changes come from the watch-lab-notes
    event that triggered the run, when one did."""
    recipe = load_recipe(recipe_path, overrides or [])
    preflight(recipe)
    logger = get_run_logger()
    logger.info(f"recipe {recipe.name}: store {recipe.store.uri}")
    if notes_fingerprint:
        twin = run_for_same_notes(recipe_path, overrides or [], notes_fingerprint)
        if twin is not None:
            logger.info(f"lab notes fingerprint {notes_fingerprint} with this recipe is already being (or was) trained by "
                        f"flow run {twin}; nothing to do")
            return {}
        logger.info(f"triggered by lab notes fingerprint {notes_fingerprint}")
        create_markdown_artifact(key="lab-notes-changes", markdown=changes_markdown(
            {"fingerprint": notes_fingerprint, **(notes_changes or {})}), description="The lab-notes change this run trains on")
    store = recipe.store.open()
    run_id = str(flow_run.id or f"local-{int(time.time())}")
    # the run's record in the store: which outputs it uses, so `labtune store gc` keeps them
    record_run(store, run_id, name=flow_run.name, recipe=recipe.name, recipe_path=recipe_path, state="running",
               source=f"deployment {flow_run.flow_name}/{deployment.name}" if deployment.id else "cli")
    try:
        stages = run_stages(recipe, recipe_path, overrides or [], store, lambda r: record_run(store, run_id, stages={r.stage: r.uri}))
    except BaseException as exc:
        record_run(store, run_id, state="failed")
        known = one_line(exc) if isinstance(exc, Exception) else None
        if known:  # the UI's state message is the line the command line prints; the error travels with it
            return Failed(message=known[0], data=exc)
        raise
    record_run(store, run_id, state="completed")
    create_table_artifact(key="stages", table=[{"stage": name, **result} for name, result in stages.items()],
                          description=f"Recipe {recipe.name}: each stage's output in the store, and whether it was cached")
    create_markdown_artifact(key="store-usage", markdown=usage_markdown(store),
                             description="The store's size by stage after this run")
    return stages


# each stage's task, called with the recipe, the flow's store and its inputs' URIs (train runs as a subflow, below)
TASKS = {"weights": weights_task, "delta": delta_task, "replay": replay_task, "data": data_task,
         "synthesize": synthesize_task, "tokenize": tokenize_task,
         "evaluate": evaluate_task, "export": export_task}


def run_stages(recipe: Recipe, recipe_path: str, overrides: list[str], store, done) -> dict[str, dict]:
    """The stages in the order of labtune.stages.GRAPH (those the recipe asks for), each given its
    inputs' URIs; done(result) after each. Train runs as a subflow; train, evaluate and synthesize also have
    flows of their own, so that with `deployments.<stage>` set a deployment runs them on the GPU
    work pool and this flow waits for the output's manifest."""
    local = {**TASKS, "train": lambda recipe, store, **uris: StageResult(**train_flow(recipe_path, overrides=overrides,
                                                                                      **uris))}
    outputs: dict[str, StageResult] = {}
    for stage in (stage for stage in GRAPH if stage.wanted(recipe)):
        uris = input_uris(stage.name, {name: result.uri for name, result in outputs.items()})
        deployment = getattr(recipe.deployments, stage.name, None)
        if deployment:
            outputs[stage.name] = remote_stage(deployment, stage.name, {"recipe_path": recipe_path, **uris,
                                                                        "overrides": overrides},
                                               output_uri(stage.name, recipe, store, uris), store)
        else:
            outputs[stage.name] = local[stage.name](recipe, store, **uris)
        done(outputs[stage.name])
    return {name: result.to_dict() for name, result in outputs.items()}


if __name__ == "__main__":
    finetune(sys.argv[1], sys.argv[2:])
