"""One writer per stage output: a lease in the store that other runs of the same stage wait on.

Two runs of one recipe at once compute the same content-addressed prefix. If both wrote it, one's
manifest could list the other's files. So a run takes the stage's lease before it builds, and a run
that finds it taken waits for the manifest instead (as the nodes of a multi-node training wait
for the node holding rank 0), then uses the output as cached.

- A local store: an `flock` on `leases/<stage>/<key>.lock`. The kernel releases it when the
  holder's process ends, however it ends, so a killed run never leaves a stale lock behind.
- S3: the object `leases/<stage>/<key>.json`, created only if absent (`If-None-Match: *`), its
  heartbeat refreshed every HEARTBEAT_SECONDS by a compare-and-swap on its ETag (`If-Match`). A
  lease whose heartbeat is older than STALE_SECONDS belonged to a run that died; a waiter takes it
  over with the same compare-and-swap, so only one waiter wins. A holder whose lease was taken
  from it (it stalled past STALE_SECONDS) stops before it commits anything.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 120.0


class LeaseLost(RuntimeError):
    """Another run took this run's lease over: it must not commit."""


def lease_key(stage: str, key: str) -> str:
    return f"leases/{stage}/{key}"


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex[:12], "started": time.time()}


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another run"
    since = time.strftime("%H:%M:%S", time.localtime(holder.get("started", 0)))
    # an S3 lease says when it was last renewed; a local one is alive as long as its flock is held
    heard = f", last heard {time.time() - float(holder['heartbeat']):.0f} s ago" if "heartbeat" in holder else ""
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {since}{heard})"


class LocalLease:
    def __init__(self, root: Path, stage: str, key: str):
        self.path = root / (lease_key(stage, key) + ".lock")
        self.handle: Any = None

    def acquire(self) -> bool:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_holder()))
        handle.flush()
        self.handle = handle
        return True

    @property
    def holding(self) -> bool:
        return self.handle is not None

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def busy(self) -> bool:
        """Whether another process holds it now; writes nothing (for `labtune store gc --dry-run`)."""
        import fcntl

        if not self.path.is_file():
            return False
        with open(self.path, "rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    def check(self) -> None:
        """A flock cannot be taken over while its process lives."""

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing releases the flock; the file stays for the next writer
            self.handle = None


class S3Lease:
    def __init__(self, store: Any, stage: str, key: str):
        self.store = store
        self.key = lease_key(stage, key) + ".json"
        self.etag: str | None = None
        self.body: dict[str, Any] | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self, body: dict[str, Any], **condition: str) -> str | None:
        """Write the lease if the condition holds; its new ETag, or None when another run's write won."""
        from botocore.exceptions import ClientError

        data = json.dumps({**body, "heartbeat": time.time()}).encode()
        try:
            response = self.store.client.put_object(Bucket=self.store.bucket, Key=self.store._key(self.key), Body=data,
                                                    **condition)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return None
            raise self.store._fail(exc, self.key) from None
        return response["ETag"].strip('"')

    def _read(self) -> tuple[dict[str, Any], str] | None:
        from botocore.exceptions import ClientError

        try:
            response = self.store.client.get_object(Bucket=self.store.bucket, Key=self.store._key(self.key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self.store._fail(exc, self.key) from None
        try:
            body = json.loads(response["Body"].read())
        except ValueError:
            body = {}
        return body, response["ETag"].strip('"')

    def acquire(self) -> bool:
        body = _holder()
        etag = self._put(body, IfNoneMatch="*")
        if etag is None:
            current = self._read()
            if current is None:
                return False  # released a moment ago: the caller tries again
            held, held_etag = current
            if time.time() - float(held.get("heartbeat", 0)) < STALE_SECONDS:
                return False
            etag = self._put(body, IfMatch=held_etag)  # take over a dead run's lease: one waiter wins
            if etag is None:
                return False
        self.etag, self.body = etag, body
        self._thread = threading.Thread(target=self._beat, daemon=True, name="labtune-lease")
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                etag = self._put(self.body or {}, IfMatch=self.etag or "")
            except Exception:  # an S3 hiccup: the next beat tries again, well inside STALE_SECONDS
                continue
            if etag is None:
                self.lost = True
                return
            self.etag = etag

    @property
    def holding(self) -> bool:
        return self.etag is not None

    def holder(self) -> dict[str, Any] | None:
        current = self._read()
        return current[0] if current else None

    def busy(self) -> bool:
        """Whether a live run holds it (a heartbeat within STALE_SECONDS); writes nothing."""
        current = self._read()
        return current is not None and time.time() - float(current[0].get("heartbeat", 0)) < STALE_SECONDS

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"{self.store.uri_for(self.key)}: another run took this stage over after this run was "
                            f"silent for {STALE_SECONDS:.0f} s; nothing was committed")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost or self.etag is None:
            return
        current = self._read()
        if current is not None and current[0].get("id") == (self.body or {}).get("id"):
            self.store.delete(self.key)
        self.etag = None


def lease_for(store: Any, stage: str, key: str) -> LocalLease | S3Lease:
    local = store.local_path("")
    return LocalLease(local, stage, key) if local is not None else S3Lease(store, stage, key)
