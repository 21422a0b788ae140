"""Training checkpoints in the store, written by the torchrun worker (no Prefect here).

A run's checkpoints live under `checkpoints/<train stage key>/step-NNNNNNN/`: the
`torch.distributed.checkpoint` files (`.metadata` and one `__R_0.distcp` per rank), each rank's
RNG state and rank 0's `trainer_state.json`. Every rank uploads its own files from its own disk
(so nodes need no shared filesystem) and then a small `ranks/R.json` listing them; rank 0 waits
for every rank's list and writes `manifest.json` last. A step without a manifest is incomplete and
never resumed from. After a commit the oldest steps beyond save_total_limit are deleted, manifest
first.
"""

from __future__ import annotations

import json
import re
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from labtune.store.backends import Store, StoreError, StoreSettings, is_disk_full, open_store
from labtune.store.hashing import sha256_file
from labtune.store.outputs import verify_uploaded
from labtune.training.worker_config import WorkerError

MANIFEST = "manifest.json"
_STEP = re.compile(r"(?:^|/)step-(\d+)/manifest\.json$")


def step_prefix(prefix: str, step: int) -> str:
    return f"{prefix}/step-{step:07d}"


def committed_steps(store: Store, prefix: str) -> list[int]:
    """Steps with a complete checkpoint (manifest present), oldest first."""
    steps = []
    for key in store.list(prefix):
        match = _STEP.search(key[len(prefix):])
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_step(store: Store, prefix: str) -> int | None:
    steps = committed_steps(store, prefix)
    return steps[-1] if steps else None


def upload_rank_files(store: Store, prefix: str, step: int, rank: int, local_dir: Path, files: list[Path]) -> None:
    """Upload this rank's files of one checkpoint, then the list that tells rank 0 they are there."""
    base = step_prefix(prefix, step)
    entries = []
    for path in files:
        rel = path.relative_to(local_dir).as_posix()
        entries.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
        store.upload(path, f"{base}/{rel}")
    store.write_bytes(f"{base}/ranks/{rank}.json", json.dumps(entries).encode())


def commit(store: Store, prefix: str, step: int, world: int, meta: dict[str, Any], timeout: float = 1800.0) -> str:
    """Wait for every rank's file list, then write the manifest (last). Returns the step's URI."""
    base = step_prefix(prefix, step)
    deadline = time.time() + timeout
    files: list[dict[str, Any]] = []
    for rank in range(world):
        while True:
            try:
                files += json.loads(store.read_bytes(f"{base}/ranks/{rank}.json"))
                break
            except StoreError:
                if store.exists(f"{base}/ranks/{rank}.failed"):  # that rank gave up: no need to wait for it
                    raise StoreError(f"{store.uri_for(base)}: rank {rank} could not upload its checkpoint files; "
                                     "the checkpoint stays incomplete") from None
                if time.time() > deadline:
                    raise StoreError(f"{store.uri_for(base)}: rank {rank} did not upload its checkpoint files "
                                     f"within {timeout:.0f}s; the checkpoint stays incomplete") from None
                time.sleep(0.2)
    verify_uploaded(store, base, files)
    manifest = {"stage": "checkpoint", "step": step, "world_size": world, "files": sorted(files, key=lambda f: f["path"]),
                "uri": store.uri_for(base), "committed": time.time(), **meta}
    store.write_bytes(f"{base}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    return store.uri_for(base)


def prune(store: Store, prefix: str, keep: int | None) -> list[int]:
    """Delete the oldest complete checkpoints beyond keep (manifest first, so a half-deleted step
    is never taken for complete), and any incomplete step older than the newest complete one."""
    steps = committed_steps(store, prefix)
    doomed = steps[:-keep] if keep and len(steps) > keep else []
    newest = steps[-1] if steps else None
    stale = {int(m.group(1)) for key in store.list(prefix)
             if (m := re.search(r"step-(\d+)/", key[len(prefix):]))} - set(steps)
    doomed += [s for s in stale if newest is not None and s < newest]
    for step in doomed:
        base = step_prefix(prefix, step)
        store.delete(f"{base}/{MANIFEST}")
        store.delete_prefix(base)
    return sorted(doomed)


def download(store: Store, prefix: str, step: int, dest: Path) -> dict[str, Any]:
    """Copy a complete checkpoint into dest, each file's sha256 checked; returns its manifest."""
    base = step_prefix(prefix, step)
    manifest = json.loads(store.read_bytes(f"{base}/{MANIFEST}"))
    for entry in manifest["files"]:
        target = dest / entry["path"]
        store.download(f"{base}/{entry['path']}", target)
        if target.stat().st_size != entry["size"] or sha256_file(target) != entry["sha256"]:
            raise StoreError(f"{store.uri_for(base)}/{entry['path']}: sha256 does not match the checkpoint manifest")
    return manifest


def download_newest_whole(store: Store, prefix: str, dest_for: Callable[[int], Path],
                          log: Callable[[str], None]) -> int | None:
    """The newest checkpoint whose every file is there with its manifest's sha256, downloaded to
    dest_for(step); a broken one (a rank file missing or corrupt) is named in the log and the one
    before it is tried. None when no checkpoint is whole. Nothing is loaded from a partial one."""
    import shutil

    for step in reversed(committed_steps(store, prefix)):
        dest = dest_for(step)
        shutil.rmtree(dest, ignore_errors=True)
        try:
            download(store, prefix, step, dest)
            return step
        except (StoreError, ValueError) as exc:
            shutil.rmtree(dest, ignore_errors=True)
            first = (str(exc).splitlines() or [""])[0]
            log(f"checkpoint step {step} is broken, not resumed from: {first}; trying the one before it")
    return None


class BackgroundUploader:
    """Uploads one checkpoint at a time in a thread while training goes on. Rank 0 also commits
    the manifest and prunes. An upload that fails is reported and leaves the step incomplete;
    training continues (the next checkpoint may succeed)."""

    def __init__(self, store: StoreSettings, prefix: str, rank: int, world: int, keep: int | None,
                 log: Callable[[str], None]):
        self.settings, self.prefix, self.rank, self.world, self.keep = store, prefix, rank, world, keep
        self.log = log
        self.thread: threading.Thread | None = None
        self.committed: list[str] = []
        self.fatal: str | None = None  # a full disk: the training stops at its next checkpoint or end

    def _store(self) -> Store:
        return open_store(self.settings)

    def start(self, step: int, local_dir: Path, files: list[Path], meta: dict[str, Any]) -> None:
        self.wait()
        self.thread = threading.Thread(target=self._run, args=(step, local_dir, files, meta), daemon=True,
                                       name=f"checkpoint-upload-{step}")
        self.thread.start()

    def _run(self, step: int, local_dir: Path, files: list[Path], meta: dict[str, Any]) -> None:
        started = time.time()
        try:
            store = self._store()
            upload_rank_files(store, self.prefix, step, self.rank, local_dir, files)
            for path in files:
                path.unlink(missing_ok=True)
            if self.rank == 0:
                uri = commit(store, self.prefix, step, self.world, meta)
                self.committed.append(uri)
                pruned = prune(store, self.prefix, self.keep)
                self.log("checkpoint " + json.dumps({"step": step, "uri": uri, "upload_seconds": round(time.time() - started, 2),
                                                     "pruned_steps": pruned}))
        except Exception as exc:  # the training goes on; this step simply stays incomplete
            first = (str(exc).splitlines() or [""])[0]
            if is_disk_full(exc):
                self.fatal = f"checkpoint step {step}: {first}"
            try:  # tell rank 0, which would otherwise wait for this rank's files until its timeout
                self._store().write_bytes(f"{step_prefix(self.prefix, step)}/ranks/{self.rank}.failed", first.encode())
            except Exception:  # noqa: BLE001 - the store is still away: rank 0 waits until its timeout
                self.log(f"rank {self.rank}: could not mark checkpoint step {step} as failed either")
            print(f"warning (rank {self.rank}): checkpoint step {step} was not uploaded: {type(exc).__name__}: {first}",
                  flush=True)
            traceback.print_exc()

    def raise_fatal(self) -> None:
        """A checkpoint that could not be stored for want of space ends the training: every later
        one would fail too, and the final model after it."""
        if self.fatal:
            raise WorkerError(self.fatal)

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
