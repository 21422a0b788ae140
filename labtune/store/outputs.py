"""The stage contract: content-addressed outputs with a manifest written last.

A stage's output lives under `<stage>/<key>` in the store, where key hashes the stage's code,
its inputs' identities and its parameters. `manifest.json` (files, sizes, sha256, inputs,
parameters, timings) is written after every file: an output without one is incomplete and
never used, and an output with one makes the stage a cache hit.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from labtune import __version__
from labtune.errors import LabtuneError
from labtune.store.backends import (
    LocalStore,
    Store,
    StoreError,
    StoreSettings,
    disk_full,
    is_disk_full,
    labtune_home,
    open_store,
    scratch_dir,
)
from labtune.store.hashing import output_sha256, sha256_file
from labtune.store.lease import describe, lease_for

MANIFEST = "manifest.json"
LEASE_POLL_SECONDS = 2.0  # how often a run waiting on another's build looks for its manifest
Log = Callable[[str], None]
_logger = logging.getLogger("labtune")


def default_log(message: str) -> None:
    _logger.info(message)


class CommittedElsewhere(Exception):
    """Raised by a build whose output another process (another node) commits: run_stage waits for
    that manifest instead of writing one."""


class ManifestError(LabtuneError):
    """An output is missing, incomplete or corrupt; the message names its URI."""


@dataclass
class StageResult:
    stage: str
    uri: str
    cached: bool
    seconds: float
    # the output's manifest as run_stage read or wrote it (its report or summary included): what a
    # caller needs of it is here, not read back from the store
    manifest: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "uri": self.uri, "cached": self.cached, "seconds": self.seconds}


def code_version(*modules: ModuleType | str) -> str:
    """Hash of the source of the modules (or dotted module names) that produce a stage's output:
    a code change is a new output. A name is found without importing it (the worker's modules
    import torch; the flow that keys the train stage need not)."""
    digest = hashlib.sha256()
    for module in modules:
        source = importlib.util.find_spec(module).origin if isinstance(module, str) else module.__file__
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()[:16]


def stage_key(stage: str, code: str, inputs: dict[str, Any], parameters: dict[str, Any]) -> str:
    blob = json.dumps({"stage": stage, "code": code, "inputs": inputs, "parameters": parameters}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class StageKey(NamedTuple):
    """What every stage's `<stage>_key(recipe, store, **input URIs)` returns: the key of its output
    (`<stage>/<key>` in the store) and the inputs and parameters its manifest records."""

    key: str
    inputs: dict[str, Any]
    parameters: dict[str, Any]


def output_prefix(stage: str, key: str) -> str:
    """Where a stage's output lives in the store: the one place that layout is spelled out."""
    return f"{stage}/{key}"


def checkpoint_prefix(train_key: str) -> str:
    """Where a training run's checkpoints live (beside, not inside, its output)."""
    return f"checkpoints/{train_key}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def read_manifest(store: Store, prefix: str) -> dict[str, Any] | None:
    key = _join(prefix, MANIFEST)
    if not store.exists(key):
        return None
    try:
        return json.loads(store.read_bytes(key))
    except json.JSONDecodeError:
        raise ManifestError(f"{store.uri_for(key)}: manifest is not valid JSON") from None


def commit(
    store: Store,
    prefix: str,
    local_dir: Path,
    *,
    stage: str,
    inputs: dict[str, Any],
    parameters: dict[str, Any],
    started: float,
    extra: dict[str, Any] | None = None,
    log: Log = default_log,
    before_manifest: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Upload every file of local_dir under prefix, then the manifest, last. `before_manifest`
    may still stop it (a lost lease) after the files are up."""
    files = []
    local_files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    if not local_files:
        raise ManifestError(f"{store.uri_for(prefix)}: stage {stage} produced no files")
    for path in local_files:
        rel = path.relative_to(local_dir).as_posix()
        if rel == MANIFEST:
            raise ManifestError(f"{store.uri_for(prefix)}: a stage may not write its own {MANIFEST}")
        digest = output_sha256(path)
        size = path.stat().st_size
        in_place = store.local_path(_join(prefix, rel)) == path.resolve()
        if size > 32 * 1024 * 1024 and not in_place:
            log(f"uploading {rel} ({size / 1e6:.0f} MB) to {store.uri_for(prefix)}")
        store.upload(path, _join(prefix, rel))
        files.append({"path": rel, "size": size, "sha256": digest})
    verify_uploaded(store, prefix, files)
    finished = time.time()
    manifest = {
        "stage": stage,
        "uri": store.uri_for(prefix),
        "labtune_version": __version__,
        "files": files,
        "inputs": inputs,
        "parameters": parameters,
        "timings": {"started": started, "finished": finished, "seconds": round(finished - started, 3)},
        **(extra or {}),
    }
    if before_manifest is not None:
        before_manifest()
    store.write_bytes(_join(prefix, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def cached_changes(store: Store, prefix: str, manifest: dict[str, Any]) -> str | None:
    """What changed in a complete output since its manifest was written, or None: every listed
    file is there at its size, and a local file touched after the manifest still has its sha256
    (an untouched one is not read again, so a cached model costs a listing, not a hash)."""
    sizes = store.sizes(prefix)
    local = store.local_path(prefix)
    written = (local / MANIFEST).stat().st_mtime_ns if local is not None else 0
    for entry in manifest.get("files", []):
        if sizes.get(_join(prefix, entry["path"])) != entry["size"]:
            found = sizes.get(_join(prefix, entry["path"]))
            return f"{entry['path']}: " + ("missing" if found is None else f"{found:,} bytes, the manifest says {entry['size']:,}")
        path = local / entry["path"] if local is not None else None
        if path is not None and path.stat().st_mtime_ns > written and sha256_file(path) != entry["sha256"]:
            return f"{entry['path']}: changed after it was written (sha256 differs from the manifest)"
    return None


def verify_uploaded(store: Store, prefix: str, files: list[dict[str, Any]]) -> None:
    """Every file a manifest is about to list is in the store at its full size (one listing), so
    no manifest ever points at a missing or partial object."""
    present = store.sizes(prefix)
    for entry in files:
        size = present.get(_join(prefix, entry["path"]))
        if size != entry["size"]:
            found = "missing" if size is None else f"{size} of {entry['size']} bytes"
            raise ManifestError(f"{store.uri_for(_join(prefix, entry['path']))}: upload incomplete ({found}); "
                                f"no manifest written")


def fetch(store: Store, uri: str, log: Log = default_log) -> Path:
    """A local directory holding a complete stage output, every file's sha256 verified.

    Local stores are read in place; S3 outputs are downloaded once into the labtune cache
    (keyed by the manifest's own hash, so a re-written output is fetched again).
    """
    prefix = store.key_for(uri)
    raw_manifest = _manifest_bytes(store, prefix, uri)
    manifest = json.loads(raw_manifest)
    local = store.local_path(prefix)
    if local is not None:
        stamp = _stamp(local, manifest, raw_manifest)
        if not stamp or stamp not in _VERIFIED:  # a stage that fetches one output three times hashes it once
            for entry in manifest["files"]:
                _verify(local / entry["path"], entry, uri)
            if stamp:
                _VERIFIED.add(stamp)
        return local
    cache = labtune_home() / "cache" / hashlib.sha256(raw_manifest).hexdigest()[:24]
    if (cache / MANIFEST).is_file():
        return cache
    # this process's own staging folder: two runs fetching one output at once never share files
    staging = cache.with_name(f"{cache.name}.{os.getpid()}.{time.monotonic_ns()}.part")
    total = sum(entry["size"] for entry in manifest["files"])
    log(f"downloading {uri} ({len(manifest['files'])} files, {total / 1e6:.1f} MB)")
    try:
        for entry in manifest["files"]:
            target = staging / entry["path"]
            store.download(_join(prefix, entry["path"]), target)
            _verify(target, entry, uri)
        (staging / MANIFEST).write_bytes(raw_manifest)
        if (cache / MANIFEST).is_file():  # another run fetched it meanwhile
            return cache
        shutil.rmtree(cache, ignore_errors=True)
        try:
            staging.rename(cache)
        except OSError:
            if not (cache / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache


# an input given by URI may come from these stages (with no delta, the weights output is the target)
ACCEPTED_STAGES = {"delta": ("delta", "weights", "merge-delta", "merge-lora")}


def require_output(store: Store, uri: str, stage: str) -> None:
    """A URI given for `stage`'s output (`--weights`, `--target`, `--data`, `--tokens`, `--tuned`) names a complete
    output of that stage in this store: checked before anything runs or is called cached."""
    if "://" not in uri and not Path(uri).expanduser().exists():
        raise ManifestError(f"{uri}: no such folder")
    try:
        prefix = store.key_for(uri)
    except StoreError as exc:
        raise ManifestError(str(exc)) from None
    manifest = read_manifest(store, prefix)
    if manifest is None:
        raise ManifestError(f"{uri}: no complete output here (manifest.json missing)")
    accepted = ACCEPTED_STAGES.get(stage, (stage,))
    if manifest.get("stage") not in accepted:
        raise ManifestError(f"{uri}: a {manifest.get('stage')} output, where a {stage} output is wanted")


# local outputs this process has verified, by their manifest's hash and every file's size and mtime:
# a file touched since is hashed again
_VERIFIED: set[tuple] = set()


def _stamp(local: Path, manifest: dict[str, Any], raw_manifest: bytes) -> tuple:
    files = []
    for entry in manifest["files"]:
        try:
            st = (local / entry["path"]).stat()
        except OSError:
            return ()  # a missing file: never a verified stamp, so _verify names it
        files.append((entry["path"], st.st_size, st.st_mtime_ns))
    return (str(local), hashlib.sha256(raw_manifest).hexdigest(), tuple(files))


def _manifest_bytes(store: Store, prefix: str, uri: str) -> bytes:
    try:
        return store.read_bytes(_join(prefix, MANIFEST))
    except StoreError:
        raise ManifestError(f"{uri}: no complete output here (manifest.json missing)") from None


def _verify(path: Path, entry: dict[str, Any], uri: str) -> None:
    if not path.is_file():
        raise ManifestError(f"{uri}/{entry['path']}: file listed in the manifest is missing")
    if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
        raise ManifestError(f"{uri}/{entry['path']}: sha256 does not match the manifest")


def run_stage(
    store: Store,
    stage: str,
    key: str,
    build: Callable[[Path], dict[str, Any] | None],
    *,
    inputs: dict[str, Any],
    parameters: dict[str, Any],
    log: Log = default_log,
    work_name: str | None = None,
    wait_seconds: float = 3600.0,
) -> StageResult:
    """Skip the stage when its manifest exists; otherwise build into a scratch dir and commit.

    One writer per output (labtune/store/lease.py): a run that finds another building the same prefix
    waits for its manifest and returns it as cached. The nodes of one multi-node stage
    (`work_name` set) agree by rank instead: the one holding rank 0 commits."""
    prefix = output_prefix(stage, key)
    started = time.time()
    manifest = read_manifest(store, prefix)
    changed = cached_changes(store, prefix, manifest) if manifest is not None else None
    if manifest is not None and changed is None:
        log(f"{stage}: cached at {store.uri_for(prefix)}")
        return StageResult(stage, store.uri_for(prefix), True, round(time.time() - started, 3), manifest)
    if changed is not None:  # the manifest no longer tells the truth: withdrawn, and the output built again
        log(f"{stage}: {store.uri_for(prefix)}/{changed}; building it again")
        store.delete(_join(prefix, MANIFEST))
    lease = None
    if work_name is None:
        lease = _writer_lease(store, stage, key, log)
        if lease is None:
            log(f"{stage}: cached at {store.uri_for(prefix)} (built by another run)")
            return StageResult(stage, store.uri_for(prefix), True, round(time.time() - started, 3),
                               read_manifest(store, prefix))
    # a folder of this process's own: two runs of one stage on this machine never share scratch
    work = labtune_home() / "work" / f"{work_name or f'{stage}-{key}'}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    out = work / "out"
    out.mkdir(parents=True)
    try:
        try:
            extra = build(out) or {}
        except CommittedElsewhere as reason:
            log(f"{stage}: {reason}; waiting for {store.uri_for(prefix)}/{MANIFEST}")
            _wait_for_manifest(store, prefix, wait_seconds)
            seconds = round(time.time() - started, 3)
            return StageResult(stage, store.uri_for(prefix), False, seconds, read_manifest(store, prefix))
        except Exception as exc:
            if is_disk_full(exc) and not isinstance(exc, StoreError):  # the scratch folder filled: one line, no manifest
                raise disk_full(getattr(exc, "filename", None) or out, None) from None
            raise
        manifest = commit(store, prefix, out, stage=stage, inputs=inputs, parameters=parameters,
               started=started, extra=extra, log=log, before_manifest=lease.check if lease else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if lease is not None:
            lease.release()
    seconds = round(time.time() - started, 3)
    log(f"{stage}: done in {seconds:.1f}s -> {store.uri_for(prefix)}")
    return StageResult(stage, store.uri_for(prefix), False, seconds, manifest)


def _writer_lease(store: Store, stage: str, key: str, log: Log) -> Any:
    """The lease on this output, once no other run holds it; None when the other run committed
    the output meanwhile (it is then cached)."""
    prefix = output_prefix(stage, key)
    lease = lease_for(store, stage, key)
    waited = False
    while not lease.acquire():
        if not waited:
            log(f"{stage}: {describe(lease.holder())} is building {store.uri_for(prefix)}; waiting for its manifest")
            waited = True
        if read_manifest(store, prefix) is not None:
            break
        time.sleep(LEASE_POLL_SECONDS)
    if read_manifest(store, prefix) is not None:  # the other run committed while this one looked
        if lease.holding:
            lease.release()
        return None
    return lease


def _wait_for_manifest(store: Store, prefix: str, wait_seconds: float) -> None:
    """Until the node holding rank 0 commits the output (ManifestError after wait_seconds)."""
    deadline = time.time() + wait_seconds
    while read_manifest(store, prefix) is None:
        if time.time() > deadline:
            raise ManifestError(f"{store.uri_for(prefix)}: no manifest after {wait_seconds:.0f}s; "
                                "the node that held rank 0 did not commit") from None
        time.sleep(1.0)


def publish(
    out: str,
    build: Callable[[Path], dict[str, Any] | None],
    *,
    stage: str,
    inputs: dict[str, Any],
    parameters: dict[str, Any],
    settings: StoreSettings | None = None,
    log: Log = default_log,
) -> tuple[str, bool]:
    """Build into a plain directory or s3:// prefix named by the user (not content-addressed),
    with the same contract: manifest.json last. Returns (uri, already_there): an OUT whose
    manifest records the same inputs and parameters is left as it is."""
    started = time.time()
    store = open_store(settings.at(out) if settings else StoreSettings(out))
    existing = read_manifest(store, "")
    if existing is not None:
        if existing.get("inputs") == inputs and existing.get("parameters") == parameters:
            log(f"{store.uri} already holds this output (manifest.json matches); nothing to do")
            return store.uri, True
        raise ManifestError(f"{store.uri}: already holds another output (see its {MANIFEST}); "
                            "choose another OUT or delete it")
    if isinstance(store, LocalStore):
        work = store.root
        if work.exists() and any(work.iterdir()):
            raise ManifestError(f"{work}: directory is not empty; choose another OUT")
        created = not work.exists()
        work.mkdir(parents=True, exist_ok=True)
    else:
        if store.list(""):
            raise ManifestError(f"{store.uri}: prefix is not empty; choose another OUT")
        work = scratch_dir(f"{stage}-")
    try:
        extra = build(work) or {}
        commit(store, "", work, stage=stage, inputs=inputs, parameters=parameters, started=started,
               extra=extra, log=log)
    except BaseException:
        if isinstance(store, LocalStore):
            _clear(work, remove=created)  # a half-written OUT never lingers
        raise
    finally:
        if not isinstance(store, LocalStore):
            shutil.rmtree(work, ignore_errors=True)
    return store.uri, False


def _clear(directory: Path, remove: bool) -> None:
    if remove:
        shutil.rmtree(directory, ignore_errors=True)
        return
    for path in directory.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def fetch_output(uri: str, settings: StoreSettings | None = None, log: Log = default_log) -> Path:
    """A complete stage output named by its URI alone (a folder or s3:// prefix holding a
    manifest.json), verified and local; a URI without a complete manifest fails naming it."""
    if uri.startswith("s3://"):
        store = open_store(settings.at(uri) if settings else StoreSettings(uri))
        store.check()  # a wrong endpoint fails now, not after the outage budget
        return fetch(store, uri, log)
    path = Path(uri).expanduser().resolve()
    if not path.is_dir():
        raise ManifestError(f"{uri}: no such folder")
    return fetch(open_store(str(path)), str(path), log)
