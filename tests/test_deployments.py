"""The Prefect way, against a real server: work pools from infra/, process workers, the
deployments of deployments/prefect.yaml; finetune sends train and evaluate to the GPU pool's
worker; the lab-notes watcher's event starts a retraining run; paths cannot escape the store."""

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_RECIPE
from labtune.store import LocalStore, StoreError
from labtune.watch import UnsafePathError, changes, fingerprint, note_listing, safe_relative


@pytest.mark.parametrize("name", ["../secrets.md", "/etc/passwd", "a/../../b.md", "a\\b.md", "", "a//b.md"])
def test_note_names_and_keys_cannot_escape_their_prefix(name, tmp_path):
    with pytest.raises(UnsafePathError, match="escapes its folder"):
        safe_relative(name, "notes")
    if name:
        with pytest.raises(StoreError, match="escapes the store"):
            LocalStore(tmp_path).write_bytes(name if name.startswith(("/", "..")) else "../" + name, b"x")
    assert not list(tmp_path.parent.glob("secrets.md"))


def test_fingerprint_changes_with_content_and_lists_what_changed(notes_copy):
    before = note_listing(str(notes_copy))
    assert fingerprint(note_listing(str(notes_copy))) == fingerprint(before)  # stable
    first = sorted(notes_copy.glob("*.md"))[0]
    first.write_text(first.read_text() + "\nAction items: order reagents\n")
    (notes_copy / "2024-01-05.md").write_text("# Lab meeting 2024-01-05\nPresenter: Ana Silva\n")
    after = note_listing(str(notes_copy))
    assert fingerprint(after) != fingerprint(before)
    assert changes(before, after) == {"added": ["2024-01-05.md"], "removed": [], "changed": [first.name]}


def _prefect(*args, api):
    env = {**__import__("os").environ, "PREFECT_API_URL": api}
    return subprocess.run([sys.executable, "-m", "prefect", *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


async def _wait_for_run(api: str, flow_run_id, timeout: float = 600):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            deadline = time.time() + timeout
            while True:
                run = await client.read_flow_run(flow_run_id)
                if run.state and run.state.is_final():
                    return run
                assert time.time() < deadline, f"flow run {run.name} still {run.state.name if run.state else None}"
                await asyncio.sleep(1)


async def _flow_runs(api: str, flow_name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


async def _logs_and_artifacts(api: str, flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return logs, artifacts


@pytest.fixture(scope="module")
def deployed(prefect_api, tmp_path_factory):
    """Pools, one fast-polling process worker per pool, and the deployments for a tiny recipe
    whose train and evaluate stages go to the GPU pool."""
    import shutil

    from labtune import stack

    root = tmp_path_factory.mktemp("deployed")
    notes = root / "labnotes"
    shutil.copytree(REPO / "examples" / "labnotes", notes)
    recipe = root / "recipe.yaml"
    text = TINY_RECIPE.read_text().replace("path: labnotes", f"path: {notes}").replace("uri: ~/.labtune/store", f"uri: {root / 'store'}")
    recipe.write_text(text + "deployments:\n  train: train/labtune-train\n  evaluate: evaluate/labtune-evaluate\n")
    started = time.time()
    stack.create_pools(prefect_api)
    for pool in stack.POOLS:
        stack.start_worker(pool, prefect_api)
    stack.deploy(str(recipe), prefect_api)
    print(f"pools, workers and deployments ready in {time.time() - started:.1f}s")
    yield prefect_api, recipe, notes, root / "store"
    stack.down(say=print, keep_server=True)


@pytest.mark.slow
def test_finetune_deployment_runs_train_and_evaluate_on_the_gpu_pool_worker(deployed):
    api, recipe, _, store = deployed
    started = time.time()
    proc = _prefect("deployment", "run", "finetune/labtune-finetune", api=api)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_id = next(line.split()[-1] for line in proc.stdout.splitlines() if "UUID" in line)
    run = asyncio.run(_wait_for_run(api, run_id))
    assert run.state.is_completed(), run.state.message
    print(f"finetune deployment run completed in {time.time() - started:.1f}s (worker pickup and flow start included)")
    assert run.work_pool_name == "labtune-cpu"
    trains = [r for r in asyncio.run(_flow_runs(api, "train")) if r.deployment_id is not None]
    assert trains and all(r.work_pool_name == "labtune-gpu" and r.state.is_completed() for r in trains)
    logs, artifacts = asyncio.run(_logs_and_artifacts(api, trains[0].id))
    messages = [log.message for log in logs]
    assert any(m.startswith("launching: -m torch.distributed.run") for m in messages)
    assert any(m.startswith("progress {") for m in messages)  # the ranks' lines in the task log
    assert {"train-progress", "train-loss", "trained-model"} <= {a.key for a in artifacts}
    evaluations = [r for r in asyncio.run(_flow_runs(api, "evaluate")) if r.deployment_id is not None]
    assert evaluations and evaluations[0].work_pool_name == "labtune-gpu"
    assert list(store.glob("train/*/manifest.json")) and list(store.glob("evaluate/*/manifest.json"))


@pytest.mark.slow
def test_changed_notes_emit_an_event_that_starts_a_retraining_run_once(deployed):
    api, recipe, notes, store = deployed

    def watch_once() -> None:
        proc = _prefect("deployment", "run", "watch-lab-notes/labtune-watch-lab-notes", api=api)
        assert proc.returncode == 0, proc.stderr[-2000:]
        run_id = next(line.split()[-1] for line in proc.stdout.splitlines() if "UUID" in line)
        assert asyncio.run(_wait_for_run(api, run_id, timeout=300)).state.is_completed()

    def triggered_runs():
        return [r for r in asyncio.run(_flow_runs(api, "finetune")) if r.parameters.get("notes_fingerprint")]

    watch_once()  # the first fingerprint this watcher sees: an event
    deadline = time.time() + 60
    while not triggered_runs():
        assert time.time() < deadline, "the event started no finetune run"
        time.sleep(0.5)
    first = triggered_runs()
    assert asyncio.run(_wait_for_run(api, first[0].id)).state.is_completed()

    watch_once()  # the same notes: no event, no run
    time.sleep(5)
    assert len(triggered_runs()) == 1

    note = sorted(notes.glob("*.md"))[0]
    note.write_text(note.read_text() + "\nAction items: replace the centrifuge rotor\n")
    emitted = time.time()
    watch_once()
    while len(triggered_runs()) < 2:
        assert time.time() < emitted + 60, "the changed notes started no run"
        time.sleep(0.5)
    print(f"event to run: {time.time() - emitted:.1f}s after the watcher started")
    second = [r for r in triggered_runs() if r.id != first[0].id][0]
    assert second.parameters["notes_changes"]["changed"] == [f"{notes}/{note.name}"]
    assert second.parameters["notes_fingerprint"] != first[0].parameters["notes_fingerprint"]
    done = asyncio.run(_wait_for_run(api, second.id))
    assert done.state.is_completed(), done.state.message
    _, artifacts = asyncio.run(_logs_and_artifacts(api, second.id))
    changes_artifact = [a for a in artifacts if a.key == "lab-notes-changes"]
    assert changes_artifact and note.name in changes_artifact[0].data
