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

from labtune.data.watch import UnsafePathError, changes, fingerprint, note_listing, safe_relative
from labtune.store.backends import LocalStore, StoreError


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


def _s3_keys(endpoint: str, bucket: str) -> set[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    return {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])}


@pytest.fixture(scope="module")
def deployed(prefect_api, s3_endpoint, tmp_path_factory):
    """Pools, one fast-polling process worker per pool, and the deployments for a tiny recipe
    whose store is S3 (moto) and whose train and evaluate stages go to the GPU pool."""
    import shutil

    import boto3

    from labtune.ops import stack

    root = tmp_path_factory.mktemp("deployed")
    notes = root / "labnotes"
    shutil.copytree(REPO / "examples" / "labnotes", notes)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="labtune-deployed")
    recipe = root / "recipe.yaml"
    text = TINY_RECIPE.read_text().replace("path: labnotes", f"path: {notes}").replace(
        "uri: ~/.labtune/store", f"uri: s3://labtune-deployed/runs\n  endpoint_url: {s3_endpoint}").replace(
        "  qa_pairs: true\n", "  qa_pairs: true\n  synthesize: {enabled: true, max_new_tokens: 16, questions_per_note: 1, rewrites: 0}\n")
    recipe.write_text(text + "deployments:\n  train: train/labtune-train\n  evaluate: evaluate/labtune-evaluate\n"
                      "  synthesize: synthesize/labtune-synthesize\n")
    started = time.time()
    stack.create_pools(prefect_api)
    # runs send a heartbeat every 30 s; a dead worker's run is marked Crashed after 60 s (90 s by default)
    stack.ensure_unresponsive_run_automation(prefect_api, 60)
    for pool in stack.POOLS:
        stack.start_worker(pool, prefect_api)
    stack.deploy(str(recipe), prefect_api)
    print(f"pools, workers and deployments ready in {time.time() - started:.1f}s")
    yield prefect_api, recipe, notes, (s3_endpoint, "labtune-deployed")
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
    deadline = time.time() + 30
    while True:  # once in a while the API answers with a run's first state for a moment after it completed
        trains = [r for r in asyncio.run(_flow_runs(api, "train")) if r.deployment_id is not None]
        if (trains and all(r.state.is_completed() for r in trains)) or time.time() > deadline:
            break
        time.sleep(1)
    for label, flow_run in (("finetune", run), ("train", trains[0])):
        pickup = (flow_run.start_time - flow_run.expected_start_time).total_seconds()
        print(f"{label}: scheduled to running in {pickup:.1f}s (worker polling and flow-process start)")
    assert trains and all(r.work_pool_name == "labtune-gpu" and r.state.is_completed() for r in trains)
    logs, artifacts = asyncio.run(_logs_and_artifacts(api, trains[0].id))
    messages = [log.message for log in logs]
    assert any(m.startswith("launching: -m torch.distributed.run") for m in messages)
    assert any(m.startswith("progress {") for m in messages)  # the ranks' lines in the task log
    assert {"train-progress", "train-loss", "trained-model"} <= {a.key for a in artifacts}
    for stage in ("evaluate", "synthesize"):
        remote = [r for r in asyncio.run(_flow_runs(api, stage)) if r.deployment_id is not None]
        assert remote and remote[0].work_pool_name == "labtune-gpu", stage
    keys = _s3_keys(*store)
    assert any(k.startswith("runs/train/") and k.endswith("/manifest.json") for k in keys)
    assert any(k.startswith("runs/evaluate/") and k.endswith("/manifest.json") for k in keys)
    assert any(k.startswith("runs/synthesize/") and k.endswith("/manifest.json") for k in keys)
    assert any(k.startswith("runs/checkpoints/") and k.endswith("/manifest.json") for k in keys)  # from the GPU worker


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

    # the same fingerprint once more (a second trigger): recognised, and nothing is trained
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        emit_event(event="labtune.labnotes.updated", resource={"prefect.resource.id": "labtune.labnotes.test"},
                   payload={**{k: first[0].parameters[k] for k in ("recipe_path", "overrides")},
                            "fingerprint": first[0].parameters["notes_fingerprint"], **first[0].parameters["notes_changes"]})
    deadline = time.time() + 60
    while len(triggered_runs()) < 2:
        assert time.time() < deadline, "the repeated event started no run"
        time.sleep(0.5)
    twin = [r for r in triggered_runs() if r.id != first[0].id][0]
    assert asyncio.run(_wait_for_run(api, twin.id)).state.is_completed()
    deadline = time.time() + 30
    while True:  # a run's last log lines reach the API shortly after its final state
        logs, _ = asyncio.run(_logs_and_artifacts(api, twin.id))
        if any("is already being (or was) trained by flow run" in log.message for log in logs) or time.time() > deadline:
            break
        time.sleep(1)
    assert any("is already being (or was) trained by flow run" in log.message for log in logs), [l.message for l in logs]
    assert not any(log.message.startswith(("launching:", "weights:")) for log in logs)
    first = [first[0], twin]

    watch_once()  # the same notes: no event, no run
    time.sleep(5)
    assert len(triggered_runs()) == 2

    note = sorted(notes.glob("*.md"))[0]
    note.write_text(note.read_text() + "\nAction items: replace the centrifuge rotor\n")
    emitted = time.time()
    watch_once()
    while len(triggered_runs()) < 3:
        assert time.time() < emitted + 60, "the changed notes started no run"
        time.sleep(0.5)
    print(f"event to run: {time.time() - emitted:.1f}s after the watcher started")
    second = [r for r in triggered_runs() if r.id not in {run.id for run in first}][0]
    assert second.parameters["notes_changes"]["changed"] == [f"{notes}/{note.name}"]
    assert second.parameters["notes_fingerprint"] != first[0].parameters["notes_fingerprint"]
    done = asyncio.run(_wait_for_run(api, second.id))
    assert done.state.is_completed(), done.state.message
    _, artifacts = asyncio.run(_logs_and_artifacts(api, second.id))
    changes_artifact = [a for a in artifacts if a.key == "lab-notes-changes"]
    assert changes_artifact and note.name in changes_artifact[0].data


def _process_tree(root: int) -> list[int]:
    """root and every descendant (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, stack_ = [], [root]
    while stack_:
        pid = stack_.pop()
        tree.append(pid)
        stack_ += children.get(pid, [])
    return tree[::-1]


def _run_deployment(api: str, name: str, parameters: dict) -> str:
    proc = _prefect("deployment", "run", name, "--params", json.dumps(parameters), api=api)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return next(line.split()[-1] for line in proc.stdout.splitlines() if "UUID" in line)


@pytest.mark.slow
def test_a_worker_that_dies_mid_training_is_crashed_and_a_rerun_resumes_from_its_checkpoint(deployed):
    """SIGKILL the GPU pool's worker, its flow-run process, torchrun and the ranks once the first
    checkpoint is in the store; Prefect's unresponsive-run automation marks the train run Crashed,
    finetune fails saying so, and running the deployment again resumes training."""
    import os
    import signal

    from labtune.ops import stack

    api, _, _, store = deployed
    parameters = {"overrides": ["train.num_train_epochs=4", "train.seed=11"]}  # a training no other test ran
    before = {k for k in _s3_keys(*store) if k.startswith("runs/checkpoints/")}
    first_id = _run_deployment(api, "finetune/labtune-finetune", parameters)
    deadline = time.time() + 300
    while not [k for k in _s3_keys(*store) - before if k.startswith("runs/checkpoints/") and k.endswith("/manifest.json")]:
        assert time.time() < deadline, "no checkpoint was committed"
        time.sleep(0.3)
    worker = stack._state()["processes"]["worker-labtune-gpu"]["pid"]
    tree = _process_tree(worker)
    assert len(tree) > 3, tree  # worker, flow run, torchrun, ranks
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed = time.time()
    first = asyncio.run(_wait_for_run(api, first_id, timeout=300))
    print(f"worker killed; finetune ended {first.state.name} {time.time() - killed:.1f}s later")
    assert first.state.is_failed(), first.state
    trains = [r for r in asyncio.run(_flow_runs(api, "train")) if r.parameters.get("overrides") == parameters["overrides"]]
    assert len(trains) == 1 and trains[0].state.is_crashed(), [(r.name, r.state.name) for r in trains]
    assert "no heartbeat" in trains[0].state.message

    stack.start_worker("labtune-gpu", api)
    second_id = _run_deployment(api, "finetune/labtune-finetune", parameters)
    second = asyncio.run(_wait_for_run(api, second_id, timeout=600))
    assert second.state.is_completed(), second.state.message
    retrain = [r for r in asyncio.run(_flow_runs(api, "train"))
               if r.parameters.get("overrides") == parameters["overrides"] and r.id != trains[0].id]
    assert len(retrain) == 1 and retrain[0].state.is_completed()
    deadline = time.time() + 30
    while True:  # a run's last log lines reach the API shortly after its final state
        logs, _ = asyncio.run(_logs_and_artifacts(api, retrain[0].id))
        resumed = [log.message for log in logs if "resumed from checkpoint step" in log.message]
        if resumed or time.time() > deadline:
            break
        time.sleep(1)
    assert resumed, [log.message for log in logs][-30:]
    print(resumed[0])


@pytest.mark.slow
def test_no_log_artifact_or_parameter_holds_the_s3_secret_key(deployed):
    """Run after the deployment tests: every log line, artifact and flow-run parameter on the
    server is searched for the secret key the workers and flows used."""
    import os

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = deployed[0]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]

    async def everything():
        with temporary_settings(updates={PREFECT_API_URL: api}):
            async with get_client() as client:
                logs, offset = [], 0
                while True:
                    page = await client.read_logs(limit=200, offset=offset)
                    logs += page
                    offset += len(page)
                    if len(page) < 200:
                        break
                artifacts = await client.read_artifacts()
                runs = await client.read_flow_runs()
        return logs, artifacts, runs

    logs, artifacts, runs = asyncio.run(everything())
    assert len(logs) > 100 and artifacts and runs
    assert not [log.message for log in logs if secret in log.message]
    assert not [a.key for a in artifacts if secret in json.dumps(a.data, default=str)]
    assert not [r.name for r in runs if secret in json.dumps(r.parameters, default=str)]


def test_stack_up_status_down_starts_and_stops_exactly_its_processes(tmp_path):
    """`labtune stack` with its own home and ports: server, S3 endpoint, pools, workers; the
    server protected by PREFECT_SERVER_API_AUTH_STRING, which labtune's calls and workers use."""
    import base64
    import os
    import urllib.error
    import urllib.request

    from conftest import free_port, run_cli

    auth = "labtune:auth-string-for-this-test"
    env = {"LABTUNE_HOME": str(tmp_path / "home"), "PREFECT_API_URL": "",
           "PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_API_AUTH_STRING": auth}
    port, s3_port = free_port(), free_port()
    up = run_cli("stack", "up", "--port", str(port), "--s3-port", str(s3_port), env=env)
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        print(up.stdout)
        assert f"Prefect server: http://127.0.0.1:{port}" in up.stdout and f"S3 endpoint: http://127.0.0.1:{s3_port}" in up.stdout
        assert "auth-string-for-this-test" not in up.stdout + up.stderr

        def work_pools(credentials: str | None) -> int:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/work_pools/filter", data=b"{}", method="POST",
                                             headers={"Content-Type": "application/json"})
            if credentials:
                request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return len(json.loads(response.read()))
            except urllib.error.HTTPError as err:
                return -err.code

        assert work_pools(None) == -401 and work_pools("labtune:wrong") == -401
        assert work_pools(auth) == 2  # created by `stack up` through the auth string
        status = json.loads(run_cli("stack", "status", "--port", str(port), env=env).stdout)
        assert status["server"]["healthy"]
        processes = status["processes"]
        assert set(processes) == {"s3", "worker-labtune-cpu", "worker-labtune-gpu"} and all(p["running"] for p in processes.values())
        pids = [p["pid"] for p in processes.values()] + [status["server"]["pid"]]
    finally:
        down = run_cli("stack", "down", env=env)
    assert down.returncode == 0, down.stderr[-2000:]
    time.sleep(1)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _chromium(url: str, out_dir: Path, name: str, must_contain: list[str]) -> str:
    """Render url headless: a screenshot and the DOM's text; retries a render that comes back
    without the expected content (the SPA sometimes needs a second try)."""
    import re
    import shutil
    import tempfile

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    flags = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
             "--virtual-time-budget=20000", "--window-size=1400,1800"]
    text = ""
    for attempt in range(3):
        with tempfile.TemporaryDirectory() as profile:
            started = time.time()
            subprocess.run(flags + [f"--user-data-dir={profile}", f"--screenshot={out_dir / f'{name}.png'}", url],
                           capture_output=True, timeout=120)
            dom = subprocess.run(flags + [f"--user-data-dir={profile}", "--dump-dom", url], capture_output=True, text=True,
                                 timeout=120).stdout
        text = " ".join(re.sub(r"<[^>]+>", " ", dom).split())
        print(f"rendered {url} (attempt {attempt + 1}) in {time.time() - started:.1f}s")
        if all(needle in text for needle in must_contain):
            (out_dir / f"{name}.txt").write_text(text)
            (out_dir / f"{name}.html").write_text(dom)
            return text
    raise AssertionError(f"{url}: the page never showed {must_contain}; last text: {text[:500]}")


@pytest.mark.slow
def test_the_ui_renders_the_flow_run_and_the_evaluation_table(deployed, tmp_path):
    """Headless Chromium renders the finetune run's page and the evaluation artifact; screenshots
    are kept in the test's folder."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = deployed[0]
    ui = api.removesuffix("/api")
    finetune = [r for r in asyncio.run(_flow_runs(api, "finetune")) if r.state and r.state.is_completed()][0]
    _chromium(f"{ui}/runs/flow-run/{finetune.id}", tmp_path, "flow-run", [finetune.name, "finetune", "Completed"])

    async def evaluation_artifact(key: str):
        with temporary_settings(updates={PREFECT_API_URL: api}):
            async with get_client() as client:
                from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

                return (await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))))[0]

    artifact = asyncio.run(evaluation_artifact("evaluation"))
    row = json.loads(artifact.data)[0]
    first_line = row["question"].split("  \n")[0]
    _chromium(f"{ui}/artifacts/artifact/{artifact.id}", tmp_path, "evaluation", [first_line, "expected", "fine-tuned"])
    assert _table_width(f"{ui}/artifacts/artifact/{artifact.id}") <= 1.0
    assert (tmp_path / "flow-run.png").stat().st_size > 10_000 and (tmp_path / "evaluation.png").stat().st_size > 10_000
    # the loss curve and the accuracy chart are pictures in the page, not links a browser will not follow
    for key, heading in (("train-summary", "Training"), ("evaluation-summary", "Evaluation")):
        pictured = asyncio.run(evaluation_artifact(key))
        _chromium(f"{ui}/artifacts/artifact/{pictured.id}", tmp_path, key, [heading])
        dom = (tmp_path / f"{key}.html").read_text()
        assert "<img" in dom and 'src="data:image/png;base64,' in dom, dom[:2000]


def _table_width(url: str) -> float:
    """How wide the page's table is against the room it has (scrollWidth / clientWidth; above 1,
    columns are cut off), at a 1400 px window, read through Chromium's DevTools protocol."""
    import shutil
    import tempfile
    import urllib.request

    from websockets.sync.client import connect

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    # chromium's helper processes may still write to the profile while it is removed
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                 "--window-size=1400,1800", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            for _ in range(300):
                if port_file.is_file() and port_file.read_text().strip():
                    break
                time.sleep(0.1)
            port = port_file.read_text().split()[0]
            pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10).read())
            with connect(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"], max_size=None) as sock:
                calls = iter(range(1, 10_000))

                def call(method: str, **params):
                    me = next(calls)
                    sock.send(json.dumps({"id": me, "method": method, "params": params}))
                    while True:
                        message = json.loads(sock.recv(timeout=30))
                        if message.get("id") == me:
                            return message["result"]

                call("Page.navigate", url=url)
                measure = ("(() => { const t = document.querySelector('.p-table'); return t && t.querySelector('td') ? "
                           "t.scrollWidth / t.clientWidth : null })()")
                for _ in range(120):
                    value = call("Runtime.evaluate", expression=measure, returnByValue=True)["result"].get("value")
                    if value is not None:
                        return value
                    time.sleep(0.25)
        finally:
            import os
            import signal

            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    raise AssertionError(f"{url}: no table rendered")


@pytest.mark.slow
@pytest.mark.parametrize("answer_columns", [1, 2, 3, 4])
def test_the_evaluation_table_fits_a_1400_px_page_with_long_answers(prefect_api, answer_columns):
    """The longest cells the table holds (a long held-out question, a recited answer cut at 90
    characters, a double-barrelled name) in each number of answer columns: no column is cut off."""
    from prefect.artifacts import create_table_artifact
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from labtune.stages.evaluate import COLUMNS
    from tasks.evaluate import evaluation_table

    answer = "On 4/14/2023 (April meetings: 7, 14, 21, 28; 14 is among them) the presenter was Alessandra Fischer-Rodriguez."
    row = {"question": "Which lab member is responsible for the task to rerun the ablation grid on the held-out split, "
                       "agreed at the lab meeting held on Friday, April 14th, 2023?",
           "expected": "Alessandra Fischer-Rodriguez", "tags": ["paraphrase", "action", "presenter"]}
    columns = [COLUMNS[i] for i in ((2,), (0, 2), (0, 1, 2), (0, 1, 2, 3))[answer_columns - 1]]
    for column, _ in columns:
        row.update({f"{column}_answer": answer, f"{column}_correct": False, f"{column}_truncated": True})
    api = prefect_api
    with temporary_settings(updates={PREFECT_API_URL: api}):
        artifact = create_table_artifact(key=f"wide-table-{answer_columns}", table=evaluation_table([row] * 3, columns))
    assert _table_width(f"{api.removesuffix('/api')}/artifacts/artifact/{artifact}") <= 1.0


@pytest.mark.slow
def test_stack_down_pauses_the_deployments_and_deletes_their_scheduled_runs(deployed):
    """What `stack up` scheduled (the watcher's cron runs) does not outlive `stack down`."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from labtune.ops import stack

    api = deployed[0]

    def scheduled_and_paused() -> tuple[int, set[bool]]:
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            ours = [d for d in client.read_deployments() if d.name.startswith(stack.DEPLOYMENT_PREFIX)]
            runs = [r for r in client.read_flow_runs(limit=200) if r.deployment_id in {d.id for d in ours}
                    and r.state_type.value == "SCHEDULED"]
            return len(runs), {d.paused for d in ours}

    for _ in range(30):  # the scheduler fills the watcher's next runs within seconds of the deployment
        if scheduled_and_paused()[0]:
            break
        time.sleep(2)
    assert scheduled_and_paused()[0] > 0
    deleted = stack.set_schedules(api, active=False)
    assert deleted > 0 and scheduled_and_paused() == (0, {True})
    stack.set_schedules(api, active=True)
    assert scheduled_and_paused()[1] == {False}
