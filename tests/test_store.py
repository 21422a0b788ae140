"""Code: the store backends and the stage contract (manifest last, sha256 verified)."""

import json
import logging
import re
import threading
from pathlib import Path

import boto3
import pytest

from labtune.store.backends import LocalStore, S3Store, StoreError, StoreUnavailable, open_store
from labtune.store.hashing import sha256_file
from labtune.store.outputs import ManifestError, commit, fetch, read_manifest, run_stage, verify_uploaded


def _stores(tmp_path, endpoint, bucket):
    return [LocalStore(tmp_path / "store"), S3Store(f"s3://{bucket}/runs", endpoint_url=endpoint)]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_commit_then_fetch_round_trip_with_manifest_last(tmp_path, s3_endpoint, bucket, backend):
    store = open_store(str(tmp_path / "store")) if backend == "local" else open_store(f"s3://{bucket}/runs", endpoint_url=s3_endpoint)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("alpha")
    (out / "sub" / "b.bin").write_bytes(bytes(range(256)) * 1000)
    manifest = commit(store, "stage/abc", out, stage="stage", inputs={"x": 1}, parameters={"p": 2}, started=0.0)
    assert [f["path"] for f in manifest["files"]] == ["a.txt", "sub/b.bin"]
    assert manifest["files"][1]["sha256"] == sha256_file(out / "sub" / "b.bin")
    assert read_manifest(store, "stage/abc")["inputs"] == {"x": 1}
    local = fetch(store, store.uri_for("stage/abc"))
    assert (local / "sub" / "b.bin").read_bytes() == (out / "sub" / "b.bin").read_bytes()


def test_s3_multipart_upload_and_download(tmp_path, s3_endpoint, bucket):
    store = S3Store(f"s3://{bucket}/big", endpoint_url=s3_endpoint)
    store.transfer.multipart_threshold = store.transfer.multipart_chunksize = 5 * 1024 * 1024
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (12 * 1024 * 1024 + 7))
    store.upload(big, "f/big.bin")
    head = boto3.client("s3", endpoint_url=s3_endpoint).head_object(Bucket=bucket, Key="big/f/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    store.download("f/big.bin", tmp_path / "back.bin")
    assert sha256_file(tmp_path / "back.bin") == sha256_file(big)


def test_corrupted_object_fails_sha256_check(tmp_path, s3_endpoint, bucket):
    store = S3Store(f"s3://{bucket}/c", endpoint_url=s3_endpoint)
    out = tmp_path / "out"
    out.mkdir()
    (out / "w.bin").write_bytes(b"weights" * 100)
    commit(store, "weights/k", out, stage="weights", inputs={}, parameters={}, started=0.0)
    store.write_bytes("weights/k/w.bin", b"tampered")
    with pytest.raises(ManifestError, match="w.bin: sha256 does not match the manifest"):
        fetch(store, store.uri_for("weights/k"))


def test_output_without_manifest_is_incomplete_and_rerun(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.write_bytes("data/k/train.json", b"[]")  # a crash left a file but no manifest
    with pytest.raises(ManifestError, match="no complete output here"):
        fetch(store, store.uri_for("data/k"))
    calls = []

    def build(out: Path):
        calls.append(1)
        (out / "train.json").write_text("[1]")

    first = run_stage(store, "data", "k", build, inputs={}, parameters={})
    second = run_stage(store, "data", "k", build, inputs={}, parameters={})
    assert (first.cached, second.cached, len(calls)) == (False, True, 1)
    assert json.loads((tmp_path / "store" / "data" / "k" / "train.json").read_text()) == [1]


def test_failing_build_writes_no_manifest(tmp_path):
    store = LocalStore(tmp_path / "store")

    def build(out: Path):
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_stage(store, "train", "k", build, inputs={}, parameters={})
    assert read_manifest(store, "train/k") is None


def test_unreachable_endpoint_is_one_line_naming_it():
    store = S3Store("s3://bucket/prefix", endpoint_url="http://127.0.0.1:9")
    with pytest.raises(StoreError) as err:
        store.check()
    assert str(err.value) == "s3://bucket/prefix: cannot reach S3 endpoint http://127.0.0.1:9"


def test_missing_bucket_is_named(s3_endpoint):
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        S3Store("s3://no-such-bucket/x", endpoint_url=s3_endpoint).check()


def test_secrets_never_appear_in_errors(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SUPERSECRETVALUE123")
    with pytest.raises(StoreError) as err:
        S3Store("s3://no-such-bucket/x", endpoint_url=s3_endpoint).read_bytes("k")
    assert "SUPERSECRETVALUE123" not in str(err.value)


def _output(tmp_path: Path, files: int = 6) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    for i in range(files):
        (out / f"part-{i}.bin").write_bytes(bytes([i]) * (200_000 + i))
    return out


def test_local_s3_endpoint_keeps_its_objects_across_a_kill_and_restart(tmp_path, restartable_s3):
    client = boto3.client("s3", endpoint_url=restartable_s3.url)
    store = S3Store("s3://labtune/keep", endpoint_url=restartable_s3.url)
    store.transfer.multipart_threshold = store.transfer.multipart_chunksize = 5 * 1024 * 1024
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (48 * 1024 + 5))  # 12 MB: a three-part upload
    store.upload(big, "big.bin")
    store.write_bytes("small", b"first")
    store.write_bytes("small", b"second")
    store.write_bytes("gone", b"x")
    store.delete("gone")
    store.write_bytes("dir/gone-too", b"x")
    store.delete_prefix("dir")
    restartable_s3.kill()
    restartable_s3.start()
    assert store.list("") == ["big.bin", "small"]
    assert store.read_bytes("small") == b"second"
    store.download("big.bin", tmp_path / "back.bin")
    assert sha256_file(tmp_path / "back.bin") == sha256_file(big)
    assert client.head_object(Bucket="labtune", Key="keep/big.bin")["ETag"].strip('"').endswith("-3")


def test_store_rides_out_an_endpoint_outage_and_commits_when_it_returns(tmp_path, restartable_s3, caplog):
    store = S3Store("s3://labtune/runs", endpoint_url=restartable_s3.url, retry_seconds=120)
    store.write_bytes("before", b"kept")
    out = _output(tmp_path)
    restartable_s3.kill()
    comeback = threading.Timer(4.0, restartable_s3.start)
    comeback.start()
    with caplog.at_level(logging.WARNING, logger="labtune.store.backends"):
        manifest = commit(store, "data/k", out, stage="data", inputs={}, parameters={}, started=0.0)
    comeback.join()
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert retries and f"S3 endpoint {restartable_s3.url} failed to upload" in retries[0]
    assert len(manifest["files"]) == 6
    local = fetch(store, store.uri_for("data/k"))  # every file there, every sha256 right
    assert sorted(p.name for p in local.iterdir() if p.name != "manifest.json") == sorted(p.name for p in out.iterdir())
    assert store.read_bytes("before") == b"kept"


def test_store_gives_up_after_retry_seconds_in_one_line_and_writes_no_manifest(tmp_path, restartable_s3):
    store = S3Store("s3://labtune/runs", endpoint_url=restartable_s3.url, retry_seconds=3)
    out = _output(tmp_path)
    restartable_s3.kill()

    def build(target: Path):
        for path in out.iterdir():
            (target / path.name).write_bytes(path.read_bytes())

    with pytest.raises(StoreUnavailable) as err:
        run_stage(store, "data", "k", build, inputs={}, parameters={})
    message = str(err.value)
    assert "\n" not in message and message.startswith("s3://labtune/runs/data/k/")
    assert f"cannot reach S3 endpoint {restartable_s3.url}" in message and "gave up after" in message
    assert "store.retry_seconds=3" in message
    assert int(re.search(r"gave up after (\d+) attempts", message).group(1)) > 1
    restartable_s3.start()
    assert read_manifest(store, "data/k") is None


def test_no_manifest_is_written_over_a_missing_or_partial_object(tmp_path, s3_endpoint, bucket):
    store = S3Store(f"s3://{bucket}/v", endpoint_url=s3_endpoint)
    store.write_bytes("out/whole.bin", b"x" * 100)
    store.write_bytes("out/cut.bin", b"x" * 40)
    files = [{"path": "whole.bin", "size": 100}, {"path": "cut.bin", "size": 100}]
    with pytest.raises(ManifestError, match=r"cut.bin: upload incomplete \(40 of 100 bytes\); no manifest written"):
        verify_uploaded(store, "out", files)
    with pytest.raises(ManifestError, match=r"lost.bin: upload incomplete \(missing\)"):
        verify_uploaded(store, "out", [{"path": "lost.bin", "size": 1}])
    verify_uploaded(store, "out", files[:1])


def test_missing_objects_and_missing_buckets_are_not_retried(s3_endpoint, bucket, caplog):
    store = S3Store(f"s3://{bucket}/x", endpoint_url=s3_endpoint, retry_seconds=60)
    with caplog.at_level(logging.WARNING, logger="labtune.store.backends"):
        with pytest.raises(StoreError, match="no such object") as missing:
            store.read_bytes("absent")
        with pytest.raises(StoreError, match="does not exist") as no_bucket:
            S3Store("s3://no-such-bucket-here/x", endpoint_url=s3_endpoint, retry_seconds=60).write_bytes("k", b"x")
    assert not isinstance(missing.value, StoreUnavailable) and not isinstance(no_bucket.value, StoreUnavailable)
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


def test_the_local_s3_log_reads_entries_that_share_a_line(tmp_path):
    """moto writes an entry, then its newline: two parts uploaded at once can land on one line."""
    from labtune.store.local_s3 import read_log

    a, b, c = ({"method": "PUT", "url": f"/labtune/k?partNumber={i}", "body": "x"} for i in (1, 2, 3))
    log = tmp_path / "requests.jsonl"
    log.write_text(json.dumps(a) + json.dumps(b) + "\n\n" + json.dumps(c) + "\n" + json.dumps(c)[:20] + "\n")
    assert read_log(log) == [a, b, c]  # the entry cut short by a kill is skipped


def test_a_restarted_local_s3_answers_only_once_every_object_is_back(restartable_s3):
    """A client retrying through a restart must never meet a half-restored endpoint: one that says
    "no such bucket" or "no such key" for what it holds (a run's checkpoint upload once gave up on
    exactly that)."""
    from botocore.config import Config
    from botocore.exceptions import ClientError, EndpointConnectionError

    writer = boto3.client("s3", endpoint_url=restartable_s3.url)
    keys = [f"objects/{i:04d}" for i in range(300)]
    for key in keys:
        writer.put_object(Bucket="labtune", Key=key, Body=key.encode())
    restartable_s3.kill()

    impatient = boto3.client("s3", endpoint_url=restartable_s3.url,
                             config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=30))
    seen: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                impatient.head_object(Bucket="labtune", Key=keys[-1])
                seen.append("found")
                return
            except EndpointConnectionError:
                seen.append("refused")
            except ClientError as exc:
                seen.append(exc.response["Error"]["Code"])
            stop.wait(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        restartable_s3.start()
        poller.join(timeout=60)
    finally:
        stop.set()
        poller.join()
    assert seen[-1] == "found" and set(seen) <= {"refused", "found"}, sorted(set(seen))
    assert writer.get_object(Bucket="labtune", Key=keys[0])["Body"].read() == keys[0].encode()


def test_a_local_output_is_hashed_once_per_process_until_a_file_changes(tmp_path):
    """A stage that fetches one output several times (evaluate: the data, the tokens, the model)
    verifies it once; a file rewritten since, even at the same size, is hashed again and refused."""
    import os

    import labtune.store.outputs as outputs

    store = LocalStore(tmp_path / "store")
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"a" * 4096)
    commit(store, "train/k1", out, stage="train", inputs={}, parameters={}, started=0.0)
    uri = store.uri_for("train/k1")
    assert fetch(store, uri) == store.local_path("train/k1")
    verified = len(outputs._VERIFIED)
    fetch(store, uri)
    assert len(outputs._VERIFIED) == verified  # the same stamp: not verified again
    target = store.local_path("train/k1") / "weights.bin"
    target.write_bytes(b"b" * 4096)  # same size, new bytes
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 1_000_000))
    with pytest.raises(ManifestError, match="weights.bin: sha256 does not match"):
        fetch(store, uri)
