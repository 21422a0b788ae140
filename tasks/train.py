"""The train stage as a Prefect task (stage logic: labtune/stages/train.py): a progress artifact
of optimizer steps, a link per committed checkpoint, the loss table and plot, a link to the model.
A crash is retried, and the retry resumes from the last checkpoint in the store."""

from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from labtune.plots import png_markdown
from labtune.recipe import Recipe
from labtune.console import artifact_link, progress_bar
from labtune.stages.train import build_train
from labtune.store.backends import Store
from labtune.store.outputs import StageResult
from tasks import ServerTolerant, retry_transient, run_log


def compute_line(metrics: dict) -> str:
    """What training cost and where early stopping ended it, as one bullet."""
    if metrics.get("train_flops") is None:
        return ""
    line = (f"- compute: {metrics['train_flops']:.3g} training FLOPs for {metrics['train_label_tokens']:,} label tokens"
            + (f" (+ {metrics['dev_flops']:.2g} for the dev questions)" if metrics.get("dev_flops") else ""))
    stopping = metrics.get("early_stopping")
    if stopping and stopping.get("evaluations"):
        ended = f"no gain after step {stopping['stopped_at']}, decayed to step {metrics['optimizer_steps']}" \
            if stopping.get("stopped_at") is not None else f"ran its {metrics['optimizer_steps']} steps"
        line += (f"; early stopping: {ended}; dev questions best {100 * stopping['best']:.0f}% at step "
                 f"{stopping['best_step']}")
    return line


@task(name="train", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def train_task(recipe: Recipe, store: Store, target_uri: str, tokens_uri: str) -> StageResult:
    progress_id = create_progress_artifact(progress=0.0, key="train-progress", description="Training: optimizer steps done")

    def on_checkpoint(record: dict) -> None:
        ui(create_link_artifact, key="train-checkpoint", link=artifact_link(record["uri"]),
           link_text=f"checkpoint at step {record['step']}", description=f"Checkpoint at optimizer step {record['step']} (resumable)")

    with run_log() as logger, progress_bar() as bar:
        shown = [-1]
        ui = ServerTolerant(logger)  # a Prefect server restarting mid-training does not stop it

        def on_progress(record: dict) -> None:
            logger.info("progress " + json.dumps(record))  # the run's log keeps every step; a terminal shows a bar
            bar(record)
            # one update per whole percent: the server shares the CPUs with training
            percent = 100 * record["step"] // record["total_steps"]
            if percent != shown[0]:
                shown[0] = percent
                ui(update_progress_artifact, progress_id, progress=float(percent))

        try:
            result = build_train(recipe, store, target_uri, tokens_uri, log=logger.info, on_progress=on_progress,
                                 on_checkpoint=on_checkpoint, run_tags={"prefect.flow_run_id": str(flow_run.id)}
                                 if flow_run.id else None)
        finally:
            ui.close()
    update_progress_artifact(progress_id, progress=100.0)
    # the two files the artifacts show, not the whole model (from an S3 store, a download of its weights)
    tuned = store.key_for(result.uri)
    metrics = json.loads(store.read_bytes(f"{tuned}/train_metrics.json"))
    history = metrics["history"]
    columns = ("step", "epoch", "loss", "learning_rate", "grad_norm", "step_time_s", "tokens_per_s", "mfu",
               "padding_fraction")
    create_table_artifact(key="train-loss", table=[{**{k: r.get(k) for k in columns},
                                                    "peak_memory_gib": max(r.get("peak_memory_gib") or [0])}
                                                   for r in history],
                          description="Training loss per optimizer step; time, tokens/s and MFU from synchronized "
                                      "wall time, peak memory of the busiest rank")
    plot = f"{tuned}/loss.png"
    resumed = metrics.get("resumed_from_step")
    create_markdown_artifact(
        key="train-summary",
        markdown="\n".join([
            f"# Training: {recipe.name}", "",
            f"- model: [{result.uri}]({artifact_link(result.uri)}){' (cached: trained earlier with the same inputs)' if result.cached else ''}",
            f"- optimizer steps: {metrics['optimizer_steps']}, world size {metrics['world_size']}, "
            f"{metrics['train_seconds']:.0f} s{f', resumed from step {resumed}' if resumed else ''}",
            f"- loss: {history[0]['loss']} at step 1 -> {history[-1]['loss']} at step {history[-1]['step']}" if history else "",
            f"- throughput: {metrics['useful_tokens_per_s']:,.0f} tokens/s over the whole run, MFU "
            f"{'%.1f%%' % (100 * metrics['mfu']) if metrics.get('mfu') is not None else 'not reported (no known peak for this device)'}"
            f", peak memory per rank {metrics.get('peak_memory_gib')} GiB" if "useful_tokens_per_s" in metrics else "",
            compute_line(metrics),
            "", png_markdown("training loss and learning rate by optimizer step", store.read_bytes(plot))
            if store.exists(plot) else "",
        ]),
        description="The fine-tuned model, its loss curve and how the run went",
    )
    create_link_artifact(key="trained-model", link=artifact_link(result.uri), link_text=result.uri,
                         description="The fine-tuned model in the store")
    return result
