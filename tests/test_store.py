"""Code: the store backends and the stage contract (manifest last, sha256 verified)."""

import json
from pathlib import Path

import boto3
import pytest

from labtune.stage import ManifestError, commit, fetch, read_manifest, run_stage
from labtune.store import LocalStore, S3Store, StoreError, open_store, sha256_file


def _stores(tmp_path, endpoint, bucket):
    return [LocalStore(tmp_path / "store"), S3Store(f"s3://{bucket}/runs", endpoint_url=endpoint)]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_commit_then_fetch_round_trip_with_manifest_last(tmp_path, s3_endpoint, bucket, backend):
    store = open_store(str(tmp_path / "store")) if backend == "local" else open_store(f"s3://{bucket}/runs", s3_endpoint)
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
