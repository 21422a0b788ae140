"""The whole finetune flow through `labtune run`, against a real Prefect server, with a local
store and with S3 on a moto server that is killed and restarted mid-run; and bad input failing in
one line with no manifest."""

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from conftest import REPO, TINY_RECIPE, run_cli

from labtune.store.hashing import sha256_file

STAGES = ["weights", "delta", "data", "tokenize", "train", "evaluate"]


def _run(*overrides: str) -> dict:
    proc = run_cli("run", str(TINY_RECIPE), *overrides, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


async def _task_runs_and_artifacts(api_url: str, flow_run_id: str):
    """The flow run's task runs, its subflow runs, and the artifacts of all of them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # prefect was imported before the fixture set PREFECT_API_URL, so name the server explicitly
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        async with get_client() as client:
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            subflows = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
            artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id] + [run.id for run in subflows])))
    return tasks, subflows, artifacts


def test_local_store_run_then_cached_then_only_train_and_evaluate_rerun(prefect_api, tmp_path):
    store = tmp_path / "store"
    first = _run(f"store.uri={store}")
    assert list(first["stages"]) == STAGES
    assert not any(first["stages"][s]["cached"] for s in ("weights", "data", "tokenize", "train", "evaluate"))
    assert first["evaluation"]["total"] == 2
    for name in ("weights", "data", "tokenize", "train", "evaluate"):
        manifest = json.loads((Path(first["stages"][name]["uri"]) / "manifest.json").read_text())
        for entry in manifest["files"]:
            assert sha256_file(Path(first["stages"][name]["uri"]) / entry["path"]) == entry["sha256"]

    tasks, subflows, artifacts = asyncio.run(_task_runs_and_artifacts(prefect_api, first["flow_run"]["id"]))
    assert sorted(t.name.rsplit("-", 1)[0] for t in tasks) == sorted(STAGES)  # train: the subflow's run in the parent
    assert all(t.state.is_completed() for t in tasks)
    assert [run.state.is_completed() for run in subflows] == [True]  # the train flow, a deployment of its own
    by_key = {}
    for artifact in artifacts:
        by_key.setdefault(artifact.key, []).append(artifact)
    assert {"stages", "data-report", "token-report", "train-progress", "train-loss", "train-summary", "trained-model",
            "train-checkpoint", "evaluation", "store-usage"} <= set(by_key)
    usage = by_key["store-usage"][0].data  # the store's size by stage: a bar chart and a table
    assert "data:image/png;base64," in usage and "| train |" in usage and "| weights |" in usage
    assert f"]({Path(first['stages']['train']['uri']).as_uri()})" in by_key["trained-model"][0].data  # a link artifact
    checkpoints = [artifact.data for artifact in by_key["train-checkpoint"]]  # one per checkpoint, newest first or not
    assert all("/checkpoints/" in link for link in checkpoints) and any("step-0000004" in link for link in checkpoints)
    loss_table = json.loads(by_key["train-loss"][0].data)
    assert [row["step"] for row in loss_table] == list(range(1, len(loss_table) + 1)) and all(r["loss"] > 0 for r in loss_table)
    summary = by_key["train-summary"][0].data  # the loss curve drawn inline: a browser opens no file:// from http
    assert "loss.png" not in summary and [line for line in summary.splitlines() if "file://" in line] == \
        [line for line in summary.splitlines() if line.startswith("- model:")]
    assert "- compute: " in summary and " training FLOPs for " in summary  # what the facts cost
    embedded = summary.split("](data:image/png;base64,")[1].split(")")[0]
    assert base64.b64decode(embedded)[:8] == b"\x89PNG\r\n\x1a\n"
    chart = by_key["evaluation-summary"][0].data  # accuracy per question type, a bar per column
    assert base64.b64decode(chart.split("](data:image/png;base64,")[1].split(")")[0])[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(by_key["evaluation"][0].data)
    assert list(rows[0]) == ["question", "expected", "base", "fine-tuned"]
    assert all(row[k][0] in "✓✗–" for row in rows for k in ("base", "fine-tuned"))
    assert (Path(first["stages"]["train"]["uri"]) / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = _run(f"store.uri={store}")
    assert all(again["stages"][s]["cached"] for s in STAGES)
    assert {s: again["stages"][s]["uri"] for s in STAGES} == {s: first["stages"][s]["uri"] for s in STAGES}

    changed = _run(f"store.uri={store}", "train.learning_rate=5.0e-4")
    assert [s for s in STAGES if not changed["stages"][s]["cached"]] == ["train", "evaluate"]


def _assert_one_line_failure(proc, *needles):
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("labtune: error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in last
    assert "Traceback" not in proc.stderr


def test_unknown_recipe_key_fails_in_one_line(prefect_api, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_RECIPE.read_text().replace("  logging_steps: 1", "  logging_step: 1"))
    proc = run_cli("run", str(bad), f"store.uri={tmp_path / 'store'}")
    _assert_one_line_failure(proc, str(bad), "train.logging_step", "unknown key")
    assert not list(tmp_path.rglob("manifest.json"))


def test_missing_notes_folder_fails_in_one_line(prefect_api, tmp_path):
    proc = run_cli("run", str(TINY_RECIPE), f"store.uri={tmp_path / 'store'}", f"data.sources.0.path={tmp_path / 'gone'}")
    _assert_one_line_failure(proc, str(tmp_path / "gone"), "lab-notes folder not found")
    assert not list(tmp_path.rglob("manifest.json"))


@pytest.mark.parametrize("case", ["no usable meeting", "smaller than one optimizer step"])
def test_a_stage_error_ends_labtune_run_in_the_stage_command_s_one_line(prefect_api, tmp_path, case):
    """The stage's error reaches `labtune run` as the line and exit code the stage command gives
    (`labtune data` for notes with no usable meeting, `labtune train` for data smaller than one
    optimizer step); no traceback on the terminal (the run's log file keeps it); the flow run's
    state message in the UI is the same line."""
    import re

    overrides = [f"store.uri={tmp_path / 'store'}"]
    if case == "no usable meeting":
        notes = tmp_path / "notes"
        notes.mkdir()
        (notes / "thoughts.md").write_text("# Some thoughts\n\nNo date anywhere.\n")
        stage, needle, error = "data", "no training conversations", "DataError"
        overrides.append(f"data.sources.0.path={notes}")
    else:
        stage, needle, error = "train", "fewer than one optimizer step takes", "TrainError"
        overrides += ["train.per_device_train_batch_size=64", "train.gradient_accumulation_steps=8"]
    alone = run_cli(stage, str(TINY_RECIPE), *overrides)
    proc = run_cli("run", str(TINY_RECIPE), *overrides)
    assert proc.returncode == alone.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if re.search(r"^labtune: error|Traceback|\| ERROR|Error: ", line)]
    assert errors == [alone.stderr.strip().splitlines()[-1]], proc.stderr[-3000:]
    assert needle in errors[0] and "Traceback" not in proc.stderr
    log = Path(re.search(r"whole log: (\S+)", proc.stderr).group(1))
    assert "Traceback" in log.read_text() and error in log.read_text()
    run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", proc.stderr).group(1)

    async def state_message() -> str:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            return (await client.read_flow_run(run_id)).state.message

    assert asyncio.run(state_message()) == errors[0].removeprefix("labtune: error: ")


def test_unreachable_s3_endpoint_fails_in_one_line(prefect_api, tmp_path):
    proc = run_cli("run", str(TINY_RECIPE), "store.uri=s3://labtune/runs", "store.endpoint_url=http://127.0.0.1:9")
    _assert_one_line_failure(proc, "s3://labtune/runs", "cannot reach S3 endpoint http://127.0.0.1:9")


@pytest.mark.parametrize("stage", ["weights", "data"])
def test_single_stage_commands_need_no_prefect_server(tmp_path, stage):
    env = {"PREFECT_API_URL": "http://127.0.0.1:9/api"}  # nothing listens there: a stage must not need it
    proc = run_cli(stage, str(TINY_RECIPE), f"store.uri={tmp_path / 'store'}", "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["stage"] == stage and (Path(result["uri"]) / "manifest.json").is_file()


def _wait_for(condition, what: str, timeout: float):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_s3_run_rides_out_the_endpoint_going_away_and_a_rerun_is_all_cached(prefect_api, restartable_s3, tmp_path):
    client = boto3.client("s3", endpoint_url=restartable_s3.url)
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        run = subprocess.Popen(
            [sys.executable, "-m", "labtune.cli", "run", str(TINY_RECIPE), "store.uri=s3://labtune/outage",
             f"store.endpoint_url={restartable_s3.url}", "store.retry_seconds=300", "--json"],
            stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, env=dict(os.environ))
    try:
        # the endpoint goes away (SIGKILL) once training has started uploading its first checkpoint
        _wait_for(lambda: client.list_objects_v2(Bucket="labtune", Prefix="outage/checkpoints/").get("KeyCount", 0) > 0,
                  "the first checkpoint upload", 300)
        restartable_s3.kill()
        killed = time.time()
        # and stays away until the run has met it, then comes back with its objects
        _wait_for(lambda: "S3 endpoint" in log_path.read_text() and "retry" in log_path.read_text(),
                  "a store retry in the run's log", 120)
        time.sleep(3)
        restartable_s3.start()
        print(f"S3 endpoint down for {time.time() - killed:.1f} s")
        out, _ = run.communicate(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
    text = log_path.read_text()
    assert run.returncode == 0, text[-3000:]
    assert f"S3 endpoint {restartable_s3.url} failed to" in text
    result = json.loads(out)
    for name in ("weights", "data", "tokenize", "train", "evaluate"):
        assert result["stages"][name]["uri"].startswith(f"s3://labtune/outage/{name}/")
    # every manifest in the bucket, stages' and checkpoints', lists only whole objects with their sha256
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="labtune", Prefix="outage/")
            for o in page.get("Contents", [])]
    manifests = [k for k in keys if k.endswith("/manifest.json")]
    assert {k.split("/")[1] for k in manifests} == {"weights", "data", "tokenize", "train", "baseline", "evaluate",
                                                    "checkpoints"}
    for key in manifests:
        prefix = key.removesuffix("manifest.json")
        for entry in json.loads(client.get_object(Bucket="labtune", Key=key)["Body"].read())["files"]:
            body = client.get_object(Bucket="labtune", Key=prefix + entry["path"])["Body"].read()
            assert (len(body), hashlib.sha256(body).hexdigest()) == (entry["size"], entry["sha256"]), prefix + entry["path"]
    again = _run("store.uri=s3://labtune/outage", f"store.endpoint_url={restartable_s3.url}")
    assert all(again["stages"][s]["cached"] for s in STAGES)


def test_labtune_run_on_a_terminal_shows_bars_and_no_json_line_per_step(prefect_api, tmp_path):
    """At a terminal the run shows a bar for training and one for evaluation and the estimate
    line; the JSON progress lines stay in the run's log file (and the UI)."""
    import re

    from test_front_door import _on_a_terminal

    out = _on_a_terminal(["run", str(TINY_RECIPE), f"store.uri={tmp_path / 'store'}"])
    assert "progress {" not in out and "Traceback" not in out
    lines = out.replace("\r", "\n").splitlines()
    assert [line for line in lines if line.startswith("train:") and "%|" in line], out[-3000:]
    assert [line for line in lines if line.startswith("evaluate:") and "%|" in line], out[-3000:]
    assert "optimizer steps, about" in out
    log = Path(re.search(r"whole log: (\S+)", out).group(1)).read_text()
    assert log.count("progress {") >= 2


def test_every_stage_of_the_graph_has_a_task_taking_its_inputs():
    import inspect

    from flows.finetune import TASKS
    from flows.train import train
    from labtune.stages import BY_NAME, GRAPH

    for stage in GRAPH:
        runner = train if stage.name == "train" else TASKS[stage.name]
        parameters = inspect.signature(getattr(runner, "fn", runner)).parameters
        assert all(BY_NAME[upstream].parameter in parameters for upstream in stage.inputs), (stage.name, list(parameters))
