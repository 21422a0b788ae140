"""Operating labtune for months: two runs of one recipe at once on one store, full disks, and the
lease that keeps one writer per stage output. Real `labtune run` processes, a real Prefect server,
a real S3 endpoint (moto) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_RECIPE, tiny_stage_inputs

from labtune.store.backends import LocalStore, open_store
from labtune.store.hashing import sha256_file
from labtune.store.outputs import fetch, read_manifest, run_stage


def _start_run(recipe: Path, overrides: list[str], home: Path) -> subprocess.Popen:
    env = {**os.environ, "LABTUNE_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "labtune.cli", "run", str(recipe), *overrides, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _every_manifest_whole(store_uri: str, endpoint: str | None) -> int:
    """Every manifest's files exist with its sizes and sha256; no stray temporary files. Returns
    how many outputs were checked."""
    store = open_store(store_uri, endpoint_url=endpoint)
    manifests = [key for key in store.list("") if key.endswith("/manifest.json") and not key.startswith("checkpoints/")]
    for key in manifests:
        fetch(store, store.uri_for(key.removesuffix("/manifest.json")))  # raises on any size or sha256 mismatch
    assert not [key for key in store.list("") if key.endswith(".part")]
    return len(manifests)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_runs_of_one_recipe_at_once_both_complete_with_the_same_whole_outputs(backend, tmp_path, prefect_api,
                                                                                 s3_endpoint, bucket):
    """Two `labtune run` processes of one recipe started together, sharing one store and one
    LABTUNE_HOME (the scratch folders of one machine): both complete, both return the same stage
    URIs, each stage is built once (the other waits for its manifest), and every manifest lists
    whole files whose sha256 match. Three rounds, each on a fresh store."""
    for round_ in range(3):
        if backend == "local":
            store_uri, endpoint = str(tmp_path / f"store{round_}"), None
            overrides = [f"store.uri={store_uri}"]
        else:
            store_uri, endpoint = f"s3://{bucket}/round{round_}", s3_endpoint
            overrides = [f"store.uri={store_uri}", f"store.endpoint_url={s3_endpoint}"]
        overrides += ["train.save_steps=2", "evaluation.heldout_notes=false"]
        home = tmp_path / "home"
        runs = [_start_run(TINY_RECIPE, overrides, home) for _ in range(2)]
        outputs = [run.communicate(timeout=900) for run in runs]
        for run, (out, err) in zip(runs, outputs):
            assert run.returncode == 0, err[-3000:]
        results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
        uris = [{name: stage["uri"] for name, stage in result["stages"].items()} for result in results]
        assert uris[0] == uris[1]
        built = [[name for name, stage in result["stages"].items() if not stage["cached"]] for result in results]
        for name in uris[0]:  # each stage built by one of the two at most (delta passes the base model through)
            assert sum(name in b for b in built) <= 1, (name, built)
        assert {"weights", "data", "tokenize", "train", "evaluate"} <= set(built[0]) | set(built[1])
        waited = "".join(err for _, err in outputs)
        assert "waiting for its manifest" in waited
        assert _every_manifest_whole(store_uri, endpoint) >= 5


def test_a_second_writer_waits_for_the_first_and_takes_its_output(tmp_path):
    """In-process, the lease's contract: the one holding it builds, the other waits for the manifest
    and gets the output as cached; a holder that fails leaves the lease to the next writer."""
    import threading

    store = LocalStore(tmp_path / "store")
    started = threading.Event()
    release = threading.Event()
    calls: list[str] = []

    def slow_build(out: Path) -> dict:
        calls.append("first")
        started.set()
        release.wait(30)
        (out / "a.txt").write_text("first writer\n")
        return {}

    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", run_stage(
        store, "demo", "k1", slow_build, inputs={}, parameters={})))
    first.start()
    assert started.wait(30)
    lines: list[str] = []

    def second_build(out: Path) -> dict:
        calls.append("second")
        (out / "a.txt").write_text("second writer\n")
        return {}

    waiter = threading.Thread(target=lambda: results.setdefault("second", run_stage(
        store, "demo", "k1", second_build, inputs={}, parameters={}, log=lines.append)))
    waiter.start()
    deadline = time.time() + 30
    while not any("waiting for its manifest" in line for line in lines):
        assert time.time() < deadline, lines
        time.sleep(0.1)
    release.set()
    first.join(30)
    waiter.join(30)
    assert calls == ["first"] and results["second"].cached and results["second"].uri == results["first"].uri
    assert (Path(results["first"].uri) / "a.txt").read_text() == "first writer\n"

    def failing(out: Path) -> dict:
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        run_stage(store, "demo", "k2", failing, inputs={}, parameters={})
    assert read_manifest(store, "demo/k2") is None
    rebuilt = run_stage(store, "demo", "k2", lambda out: (out / "b.txt").write_text("ok") and {}, inputs={}, parameters={})
    assert not rebuilt.cached and sha256_file(Path(rebuilt.uri) / "b.txt")


def test_a_dead_writers_s3_lease_is_taken_over_by_one_waiter_only(s3_endpoint, bucket, monkeypatch):
    """An S3 lease whose heartbeat stopped (its run died) is taken over by exactly one of two
    waiters: a compare-and-swap on the lease's ETag."""
    from labtune.store import lease as lease_module
    from labtune.store.lease import S3Lease

    store = open_store(f"s3://{bucket}/leases-test", endpoint_url=s3_endpoint)
    dead = S3Lease(store, "train", "k")
    assert dead.acquire()
    dead._stop.set()  # the holder's process died: no more heartbeats
    assert not S3Lease(store, "train", "k").acquire()  # fresh: not taken
    # two waiters that both found it stale race to replace it: the compare-and-swap lets one through
    _, stale_etag = dead._read()
    waiters = [S3Lease(store, "train", "k"), S3Lease(store, "train", "k")]
    swapped = [w._put({"id": f"waiter{i}"}, IfMatch=stale_etag) for i, w in enumerate(waiters)]
    assert sum(etag is not None for etag in swapped) == 1
    # through acquire(): a lease silent for longer than STALE_SECONDS is taken over
    monkeypatch.setattr(lease_module, "STALE_SECONDS", 0.0)
    holder = S3Lease(store, "train", "k")
    assert holder.acquire() and holder.holder()["id"] == holder.body["id"]
    # the dead holder, were it to wake up, finds its lease gone and commits nothing
    assert dead._put(dead.body, IfMatch=dead.etag) is None
    holder.release()
    assert not store.exists("leases/train/k.json")


@pytest.fixture(scope="module")
def tiny_stages(tmp_path_factory):
    return tiny_stage_inputs(tmp_path_factory.mktemp("operations"))


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_broken_checkpoint_is_named_and_the_one_before_it_is_resumed(tiny_stages, damage):
    """A checkpoint whose manifest exists but one of whose rank files is missing or does not match
    its sha256: the re-run says which, resumes from the complete one before it, never from the
    broken one, and trains to the end."""
    from labtune.stages.train import build_train

    recipe, store, target_uri, tokens_uri = tiny_stages
    variant = recipe.model_copy(deep=True)
    variant.train.num_train_epochs, variant.train.save_steps, variant.train.save_total_limit = 2, 4, 3
    variant.train.seed = {"missing": 1, "corrupt": 2}[damage]  # a training of its own per case
    result = build_train(variant, store, target_uri, tokens_uri, log=lambda line: None)
    manifest = store.root / store.key_for(result.uri) / "manifest.json"
    steps = sorted((store.root / "checkpoints" / manifest.parent.name).glob("step-*/manifest.json"))
    assert len(steps) >= 2, steps
    newest, before = steps[-1].parent, steps[-2].parent
    rank_file = newest / "__1_0.distcp"
    if damage == "missing":
        rank_file.unlink()
    else:
        data = bytearray(rank_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        rank_file.write_bytes(bytes(data))
    manifest.unlink()  # the trained model is gone: the stage trains again, from a checkpoint

    lines: list[str] = []
    out = fetch(store, build_train(variant, store, target_uri, tokens_uri, log=lines.append).uri)
    broken = [line for line in lines if line.startswith(f"checkpoint step {int(newest.name[5:])} is broken")]
    assert broken and "__1_0.distcp" in broken[0], [line for line in lines if "checkpoint" in line]
    assert ("no such object" if damage == "missing" else "sha256 does not match") in broken[0]
    resumed = [line for line in lines if line.startswith("resumed from checkpoint step ")]
    assert resumed and int(resumed[0].split()[4]) == int(before.name[5:])
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["resumed_from_step"] == int(before.name[5:])
    assert [r["step"] for r in metrics["history"]] == list(range(1, metrics["optimizer_steps"] + 1))


def test_a_crash_says_which_rank_failed_and_why(tiny_stages):
    """One worker killed mid-training (rank 1 of 2): the stage's error carries torchrun's root cause
    (the rank, its exit code, the signal), not torchrun's banner line."""
    import signal
    import threading

    import psutil

    from labtune.stages.train import TrainCrashed, build_train

    recipe, store, target_uri, tokens_uri = tiny_stages
    variant = recipe.model_copy(deep=True)
    variant.train.num_train_epochs, variant.train.save_strategy, variant.train.seed = 20, "no", 3
    failure: list[BaseException] = []
    progress = threading.Event()

    def attempt() -> None:
        try:
            build_train(variant, store, target_uri, tokens_uri, log=lambda line: progress.set() if line.startswith("progress ") else None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            failure.append(exc)

    thread = threading.Thread(target=attempt)
    thread.start()
    assert progress.wait(300), "training never logged a step"
    rank1 = [p for p in psutil.Process().children(recursive=True)
             if "labtune.training.worker" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGKILL)
    thread.join(timeout=180)
    assert failure and isinstance(failure[0], TrainCrashed), failure
    message = str(failure[0])
    assert "\n" not in message
    assert f"rank 1 (exit code -9): Signal 9 (SIGKILL) received by PID {rank1[0].pid}" in message, message
    assert not message.rstrip().endswith("=")


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "labtune.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "LABTUNE_HOME": str(home)}, timeout=900)


def _run_json(store: Path, home: Path, *overrides: str) -> dict:
    proc = _cli("run", str(TINY_RECIPE), f"store.uri={store}", "evaluation.heldout_notes=false", *overrides, "--json",
                home=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_store_gc_keeps_the_last_runs_and_what_a_running_run_reads(tmp_path, prefect_api):
    store, home = tmp_path / "store", tmp_path / "home"
    runs = [_run_json(store, home, f"train.seed={seed}") for seed in (1, 2, 3)]
    listed = json.loads(_cli("store", "ls", "--store", str(store), "--json", home=home).stdout)
    by_uri = {entry["uri"]: entry for entry in listed}
    last_train = runs[-1]["stages"]["train"]["uri"]
    assert by_uri[last_train]["needed"] and len(by_uri[last_train]["runs"]) == 1
    assert not by_uri[runs[0]["stages"]["train"]["uri"]]["needed"]
    assert len(by_uri[runs[0]["stages"]["weights"]["uri"]]["runs"]) == 3  # shared by all three runs
    checkpoints = [e for e in listed if e["stage"] == "checkpoints"]
    assert len(checkpoints) == 3

    before = _bytes(store)
    dry = json.loads(_cli("store", "gc", "--store", str(store), "--keep-last", "1", "--dry-run", "--json", home=home).stdout)
    assert dry["deleted"] and _bytes(store) == before  # a dry run deletes nothing
    done = json.loads(_cli("store", "gc", "--store", str(store), "--keep-last", "1", "--json", home=home).stdout)
    after = _bytes(store)
    print(f"store before gc {before:,} bytes, after gc --keep-last 1 {after:,} bytes ({len(done['deleted'])} outputs deleted)")
    assert sorted(done["deleted"]) == sorted(dry["deleted"]) and after < before
    for old in runs[:2]:
        for stage in ("train", "evaluate"):
            assert old["stages"][stage]["uri"] in done["deleted"]
    for stage in runs[-1]["stages"].values():  # the kept run's outputs are whole
        fetch(open_store(str(store)), stage["uri"])
    assert not list(store.glob("checkpoints/*/step-*/manifest.json"))  # finished trainings need no checkpoints
    assert len(list((store / "runs").glob("*.json"))) == 1

    # a gc during a run: the running run's inputs stay, and it completes
    running = _start_run(TINY_RECIPE, [f"store.uri={store}", "evaluation.heldout_notes=false", "train.seed=9",
                                       "train.num_train_epochs=12"], home)
    deadline = time.time() + 300
    while not list(store.glob("checkpoints/*/step-*/manifest.json")):  # training has started and checkpointed
        assert running.poll() is None and time.time() < deadline, running.communicate()[1][-2000:]
        time.sleep(0.5)
    during = json.loads(_cli("store", "gc", "--store", str(store), "--keep-last", "0", "--json", home=home).stdout)
    out, err = running.communicate(timeout=900)
    assert running.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    for name in ("weights", "data", "tokenize"):
        assert result["stages"][name]["uri"] not in during["deleted"]
    assert runs[-1]["stages"]["train"]["uri"] in during["deleted"]  # keep-last 0: the finished runs go
    for stage in result["stages"].values():
        fetch(open_store(str(store)), stage["uri"])


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs: a disk that really fills up (ENOSPC), unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): the full-disk test needs one")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    import shutil

    filler = disk / "filler.bin"
    with open(filler, "wb") as handle:
        handle.truncate(0)
        chunk = b"\0" * (1 << 20)
        while shutil.disk_usage(disk).free > leave + len(chunk):
            handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
    return filler


@pytest.mark.parametrize("full", ["store", "scratch"])
def test_a_full_disk_fails_the_stage_in_one_line_and_the_run_goes_on_once_space_is_freed(full, small_disk, tmp_path,
                                                                                          monkeypatch):
    from labtune.recipe import load_recipe
    from labtune.stages.data import build_data
    from labtune.stages.tokenize import build_tokenize
    from labtune.stages.train import TrainError, build_train
    from labtune.stages.weights import build_weights

    store_root = small_disk / "store" if full == "store" else tmp_path / "store"
    if full == "scratch":
        monkeypatch.setenv("LABTUNE_HOME", str(small_disk / "home"))
    recipe = load_recipe(TINY_RECIPE, [f"store.uri={store_root}", "train.save_steps=2"])
    store = LocalStore(store_root)
    target_uri = build_weights(recipe, store).uri
    tokens_uri = build_tokenize(recipe, store, target_uri, build_data(recipe, store).uri).uri
    filler = _fill(small_disk, leave=64 * 1024)  # less than one checkpoint of the tiny model

    from labtune.store.backends import DiskFull

    with pytest.raises((TrainError, DiskFull)) as failure:  # from the worker, or from the stage's own writes
        build_train(recipe, store, target_uri, tokens_uri, log=lambda line: None)
    message = str(failure.value)
    print(message)
    assert "\n" not in message and "no space left on device: needed " in message and str(small_disk) in message, message
    assert " bytes free" in message
    assert not list((store_root / "train").glob("*/manifest.json"))  # nothing half-written is marked complete

    filler.unlink()
    result = build_train(recipe, store, target_uri, tokens_uri, log=lambda line: None)
    fetch(store, result.uri)
    assert not result.cached


@pytest.mark.slow
def test_a_prefect_server_restart_during_training_loses_nothing(tmp_path, monkeypatch):
    """The Prefect server stops (SIGTERM) while the train stage runs and starts again on the same
    database: the training goes on, and the run completes, Completed in the UI. Times printed."""
    import asyncio

    from conftest import free_port

    from labtune.ops import server

    monkeypatch.setenv("LABTUNE_HOME", str(tmp_path / "home"))  # this test's own server and database
    port = free_port()
    url, _ = server.start(port=port, timeout=120)
    store = tmp_path / "store"
    env = {**os.environ, "PREFECT_API_URL": url}
    run = subprocess.Popen([sys.executable, "-m", "labtune.cli", "run", str(TINY_RECIPE), f"store.uri={store}",
                            "evaluation.heldout_notes=false", "train.num_train_epochs=16", "train.save_steps=8", "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        deadline = time.time() + 300
        while not list(store.glob("checkpoints/*/step-*/manifest.json")):  # training is under way
            assert run.poll() is None and time.time() < deadline, run.communicate()[1][-3000:]
            time.sleep(0.2)
        stopped = time.time()
        assert server.stop()
        down = time.time() - stopped
        time.sleep(5)  # the server stays away a while, as during an upgrade
        restarted = time.time()
        server.start(port=port, timeout=120)
        up = time.time() - restarted
        assert run.poll() is None, "the run died while the server was away"
        out, err = run.communicate(timeout=900)
        assert run.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        print(f"server stopped in {down:.1f} s, away 5 s, healthy again {up:.1f} s after its start; "
              f"the run completed {time.time() - stopped:.0f} s after the stop")
        assert not result["stages"]["train"]["cached"]
        assert "resumed from checkpoint" not in err  # the same training went on: nothing redone

        async def state_of(run_id: str) -> str:
            from prefect.client.orchestration import get_client
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings(updates={PREFECT_API_URL: url}):
                async with get_client() as client:
                    return (await client.read_flow_run(run_id)).state.name

        assert asyncio.run(state_of(result["flow_run"]["id"])) == "Completed"  # what the UI shows

        async def progress_logged() -> list[int]:
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.filters import LogFilter
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings(updates={PREFECT_API_URL: url}):
                async with get_client() as client:
                    logs, offset = [], 0
                    while page := await client.read_logs(log_filter=LogFilter(), limit=200, offset=offset):
                        logs += page
                        offset += len(page)
            return sorted({json.loads(log.message[len("progress "):])["step"] for log in logs
                           if log.message.startswith("progress {")})

        steps = asyncio.run(progress_logged())
        print(f"the UI holds the progress lines of {len(steps)} of {steps[-1] if steps else 0} steps")
        assert steps == list(range(1, steps[-1] + 1)) and steps[-1] >= 100  # logs of the outage were kept and sent
        fetch(open_store(str(store)), result["stages"]["evaluate"]["uri"])
    finally:
        if run.poll() is None:
            run.kill()
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_the_watcher_and_the_data_stage_on_5000_notes(backend, tmp_path, s3_endpoint, bucket):
    """5,000 generated note files: the fingerprint, an unchanged re-fingerprint, the data stage, and
    the data stage again after one note changed (S3 objects come from the local cache by ETag).
    Times are printed (bench/notes_scale.py measures their growth), not asserted."""
    sys.path.insert(0, str(REPO / "bench"))
    from notes_scale import upload, write_notes

    from labtune.data.watch import fingerprint, note_listing
    from labtune.recipe import load_recipe
    from labtune.stages.data import build_data
    from labtune.store.backends import StoreSettings

    folder = tmp_path / "notes"
    write_notes(folder, 5000)
    settings = None
    source = str(folder)
    if backend == "s3":
        source = f"s3://{bucket}/notes"
        settings = StoreSettings(source, endpoint_url=s3_endpoint)
        upload(folder, open_store(settings))
    times = {}
    started = time.time()
    listing = note_listing(source, settings)
    before = fingerprint(listing)
    times["fingerprint"] = time.time() - started
    assert len(listing) == 5000
    overrides = [f"data.sources.0.path={source}"] + ([f"store.endpoint_url={s3_endpoint}"] if settings else [])

    def data_stage(name: str) -> dict:
        recipe = load_recipe(TINY_RECIPE, [f"store.uri={tmp_path / name}", *overrides])
        began = time.time()
        result = build_data(recipe, LocalStore(tmp_path / name), log=lambda line: None)
        times[name] = time.time() - began
        return json.loads((fetch(LocalStore(tmp_path / name), result.uri) / "report.json").read_text())

    report = data_stage("data stage")
    assert sum(s["files"] for s in report if s["type"] == "lab_notes") == 5000
    note = sorted(folder.iterdir())[0]
    note.write_text(note.read_text() + "- one more action item.\n")
    if settings:
        open_store(settings).upload(note, note.name)
    started = time.time()
    assert fingerprint(note_listing(source, settings)) != before
    times["fingerprint after a change"] = time.time() - started
    data_stage("data stage after a change")
    print(f"5,000 notes ({backend}): " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in times.items()))


def test_rank_0_stops_waiting_for_a_rank_that_could_not_upload_its_checkpoint(tmp_path):
    """A rank whose upload failed marks the step; rank 0 then stops waiting for its files at once
    (it used to wait 30 minutes while the other ranks waited for it: a hang)."""
    from labtune.store.backends import StoreError
    from labtune.training import checkpoints

    store = LocalStore(tmp_path / "store")
    base = checkpoints.step_prefix("checkpoints/k", 4)
    store.write_bytes(f"{base}/ranks/0.json", b"[]")
    store.write_bytes(f"{base}/ranks/1.failed", b"bucket 'labtune' does not exist")
    started = time.time()
    with pytest.raises(StoreError, match="rank 1 could not upload its checkpoint files"):
        checkpoints.commit(store, "checkpoints/k", 4, 2, {}, timeout=600)
    assert time.time() - started < 60 and not store.exists(f"{base}/manifest.json")
