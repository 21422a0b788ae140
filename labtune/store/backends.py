"""The artifact store: a local directory (the embedded default) or S3 through boto3.

Keys are `/`-separated paths under the store's root. Both backends speak the same small
interface; S3 works against AWS, MinIO or any S3-compatible endpoint via `endpoint_url`.
Credentials are boto3's business (environment, profile, role) and never appear in messages.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from labtune.errors import LabtuneError, RunFailure

MiB = 1024 * 1024
T = TypeVar("T")


class StoreError(RunFailure):
    """A store operation failed; the message is one line naming the URI. The Prefect layer
    retries it once more, unless it is StoreUnavailable (which already waited)."""

    transient = True


class DiskFull(StoreError):
    """A local store's or scratch folder's disk is full (or read-only): not retried, the run stops."""

    transient = False


class StoreUnavailable(StoreError):
    """The S3 endpoint stayed unreachable for the whole retry budget (`store.retry_seconds`)."""

    transient = False


DEFAULT_RETRY_SECONDS = 300.0
_logger = logging.getLogger("labtune.store.backends")


def _warn(message: str) -> None:
    """A warning on the `labtune.store.backends` logger; inside a Prefect run the task layer forwards it to
    the run's log (see tasks/__init__.py), so this module never needs to know about Prefect."""
    _logger.warning(message)


_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                    "Throttling", "ThrottlingException", "RequestLimitExceeded"}


def _root_cause(exc: BaseException) -> BaseException:
    """The botocore error behind boto3's transfer wrappers."""
    from boto3.exceptions import S3UploadFailedError

    if getattr(exc, "last_exception", None) is not None:
        return exc.last_exception
    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        return exc.__context__
    return exc


def is_transient(exc: BaseException) -> bool:
    """Whether an S3 failure may go away by itself: a dropped or refused connection, a timeout,
    a 5xx or throttling. Missing objects, denied access and bad requests are not."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError, ResponseStreamingError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return error.get("Code") in _TRANSIENT_CODES or status >= 500
    return isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError,
                            ConnectionError, TimeoutError))


def labtune_home() -> Path:
    return Path(os.environ.get("LABTUNE_HOME", "~/.labtune")).expanduser()


def checked_key(key: str, where: str) -> str:
    """A store key that stays under its store's folder or prefix: no absolute paths, no `..`."""
    if key.startswith(("/", "\\")) or ".." in key.replace("\\", "/").split("/"):
        raise StoreError(f"{where}: key {key!r} escapes the store (absolute path or '..')")
    return key


def _partial(target: Path) -> Path:
    """A temporary name beside target that no other writer uses: two runs committing one file at
    once each rename a whole file into place, never a mix of both."""
    return target.with_name(f"{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")


def _disk_error(exc: OSError, path: Path, needed: int) -> StoreError | OSError:
    """A full or read-only disk as one line naming the path and the bytes it needed."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full(path, needed)
    if exc.errno in (errno.EROFS, errno.EACCES):
        reason = "read-only file system" if exc.errno == errno.EROFS else "permission denied"
        return StoreError(f"{path}: {reason}; cannot write {needed:,} bytes")
    return exc


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error (or one it wraps: torch's checkpoint writer, datasets) is a full disk."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def disk_full(path: str | os.PathLike, needed: int | None) -> "DiskFull":
    """One line naming the folder, what was being written, and the space left."""
    folder = Path(path)
    probe = folder if folder.is_dir() else folder.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    wanted = f"{needed:,} bytes" if needed else "more space"
    return DiskFull(f"{path}: no space left on device: needed {wanted}, {free:,} bytes free; free space and re-run "
                    "(finished stages are kept, training resumes from its last checkpoint)")


class LocalStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / checked_key(key, self.uri)

    def uri_for(self, key: str) -> str:
        return str(self._path(key))

    def key_for(self, uri: str) -> str:
        path = Path(uri).expanduser().resolve()
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            raise StoreError(f"{uri}: not inside the store {self.uri}") from None

    def exists(self, key: str) -> bool:
        return (self._path(key)).is_file()

    def read_bytes(self, key: str) -> bytes:
        try:
            return (self._path(key)).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{self.uri_for(key)}: no such object") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _partial(target)
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _disk_error(exc, target, len(data)) from None

    def upload(self, local: str | os.PathLike, key: str) -> None:
        target = self._path(key)
        if target.exists() and os.path.samefile(local, target):
            return  # built in place
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _partial(target)
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _disk_error(exc, target, os.path.getsize(local)) from None

    def download(self, key: str, local: str | os.PathLike) -> None:
        source = self._path(key)
        if not source.is_file():
            raise StoreError(f"{self.uri_for(key)}: no such object")
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, local)

    def local_path(self, key: str) -> Path:
        """Where an object already lies on this machine (local stores only)."""
        return self._path(key)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def sizes(self, prefix: str) -> dict[str, int]:
        """{key: size} of every object under prefix."""
        return {key: (self.root / key).stat().st_size for key in self.list(prefix)}

    def delete(self, key: str) -> None:
        (self._path(key)).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)


class S3Store:
    """Every operation rides out an endpoint outage: transient failures are retried with
    exponential backoff (1 s doubling to 30 s, jittered) for up to retry_seconds, each retry a
    warning in the log, then StoreUnavailable. Uploads are whole objects (a multipart upload
    appears only when completed), so a retried upload never leaves a partial object behind."""

    def __init__(self, uri: str, endpoint_url: str | None = None, region: str | None = None,
                 retry_seconds: float | None = None):
        if not uri.startswith("s3://"):
            raise LabtuneError(f"{uri}: not an s3:// URI")  # a mistyped path: exit 2
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise LabtuneError(f"{uri}: no bucket named")  # a mistyped path: exit 2
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url
        self.retry_seconds = DEFAULT_RETRY_SECONDS if retry_seconds is None else float(retry_seconds)
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if endpoint_url is not None and not re.fullmatch(r"https?://[^/\s:]+(:\d{1,5})?(/\S*)?", endpoint_url):
            raise LabtuneError(f"endpoint URL {endpoint_url!r}: not an S3 endpoint (expected http(s)://HOST[:PORT])")
        session = boto3.session.Session()
        self.client = session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(
                connect_timeout=5,
                read_timeout=120,
                retries={"max_attempts": 3, "mode": "standard"},
                max_pool_connections=16,
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=64 * MiB, multipart_chunksize=32 * MiB, max_concurrency=8, use_threads=True
        )

    def _key(self, key: str) -> str:
        key = checked_key(key, self.uri)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def key_for(self, uri: str) -> str:
        if uri.rstrip("/") == self.uri.rstrip("/"):
            return ""
        root = self.uri.rstrip("/") + "/"
        if not uri.startswith(root):
            raise StoreError(f"{uri}: not inside the store {self.uri}")
        return uri[len(root):].strip("/")

    def _fail(self, exc: Exception, key: str | None = None) -> StoreError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = self.uri_for(key) if key is not None else self.uri
        if isinstance(exc, EndpointConnectionError):
            return StoreError(f"{where}: cannot reach S3 endpoint {self.endpoint_url or 'AWS'}")
        if isinstance(exc, NoCredentialsError):
            return StoreError(f"{where}: no AWS credentials found (environment, profile or role)")
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "?")
            if code in ("NoSuchBucket",):
                return StoreError(f"{where}: bucket {self.bucket!r} does not exist")
            if code in ("404", "NoSuchKey", "NotFound"):
                return StoreError(f"{where}: no such object")
            return StoreError(f"{where}: S3 error {code}")
        return StoreError(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def _retrying(self, operation: Callable[[], T], key: str | None, what: str) -> T:
        """operation(), retried while its failure is transient and the budget lasts."""
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return operation()
            except Exception as exc:
                cause = _root_cause(exc)
                if not is_transient(cause):
                    raise self._fail(cause, key) from None
                where = self.uri_for(key) if key is not None else self.uri
                waited = time.monotonic() - started
                left = self.retry_seconds - waited
                if left <= 0:
                    raise StoreUnavailable(
                        f"{where}: cannot reach S3 endpoint {self.endpoint_url or 'AWS'} to {what} "
                        f"({type(cause).__name__}); gave up after {attempt} attempts over {waited:.0f} s "
                        f"(store.retry_seconds={self.retry_seconds:g})") from None
                delay = min(30.0, 2.0 ** (attempt - 1), left) * random.uniform(0.75, 1.0)
                _warn(f"{where}: S3 endpoint {self.endpoint_url or 'AWS'} failed to {what} ({type(cause).__name__}); "
                      f"retry {attempt} in {delay:.1f} s, giving up after {self.retry_seconds:g} s")
                time.sleep(delay)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return self._retrying(head, key, "look up an object")

    def read_bytes(self, key: str) -> bytes:
        return self._retrying(lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read(),
                              key, "read")

    def write_bytes(self, key: str, data: bytes) -> None:
        self._retrying(lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data), key, "write")

    def upload(self, local: str | os.PathLike, key: str) -> None:
        self._retrying(lambda: self.client.upload_file(str(local), self.bucket, self._key(key), Config=self.transfer),
                       key, "upload")

    def download(self, key: str, local: str | os.PathLike) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        # s3transfer writes to a temporary name and renames when complete
        self._retrying(lambda: self.client.download_file(self.bucket, self._key(key), str(local), Config=self.transfer),
                       key, "download")

    def local_path(self, key: str) -> None:
        return None

    def _iter_objects(self, prefix: str) -> Iterator[tuple[str, int, str]]:
        """(key relative to the store, size, ETag) of every object under prefix."""
        paginator = self.client.get_paginator("list_objects_v2")
        full = self._key(prefix).rstrip("/") + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for item in page.get("Contents", []):
                yield item["Key"][strip:], item["Size"], item["ETag"].strip('"')

    def list(self, prefix: str) -> list[str]:
        return sorted(key for key, _, _ in self.list_with_etags(prefix))

    def list_with_etags(self, prefix: str) -> list[tuple[str, int, str]]:
        """(key, size, ETag) of every object under prefix: a cheap identity for a source."""
        return self._retrying(lambda: sorted(self._iter_objects(prefix)), prefix, "list objects")

    def sizes(self, prefix: str) -> dict[str, int]:
        """{key: size} of every object under prefix (one listing, to check an upload before its manifest)."""
        return {key: size for key, size, _ in self.list_with_etags(prefix)}

    def delete(self, key: str) -> None:
        self._retrying(lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)), key, "delete")

    def delete_prefix(self, prefix: str) -> None:
        keys = [self._key(k) for k in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            self._retrying(lambda batch=batch: self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch}),
                           prefix, "delete objects")

    def check(self) -> None:
        """Pre-flight: fails at once (after boto's own three attempts), before any work is done."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                raise StoreError(f"{self.uri}: bucket {self.bucket!r} does not exist") from None
            raise self._fail(exc) from None


Store = LocalStore | S3Store


@dataclass(frozen=True)
class StoreSettings:
    """Where a store is and how to reach it: the one shape the store's settings travel in (the
    recipe's `store:` section, the worker's config, a CLI's `--endpoint-url`). Sources on S3
    (models, data) are reached with the same endpoint and retry budget: `settings.at(uri)`."""

    uri: str
    endpoint_url: str | None = None
    region: str | None = None
    retry_seconds: float = DEFAULT_RETRY_SECONDS

    def at(self, uri: str) -> "StoreSettings":
        return replace(self, uri=uri)


def open_store(where: StoreSettings | str, **settings: Any) -> Store:
    """The store at a StoreSettings (or a URI plus StoreSettings' other fields): the only way to a
    store, so every caller honours endpoint_url, region and retry_seconds."""
    if isinstance(where, str):
        where = StoreSettings(where, **{k: v for k, v in settings.items() if v is not None})
    if "://" not in where.uri or where.uri.startswith("file://"):  # one cache entry per folder, whatever the cwd
        where = where.at(str(Path(where.uri.removeprefix("file://")).expanduser().resolve()))
    return _open(where)


@functools.lru_cache(maxsize=16)
def _open(settings: StoreSettings) -> Store:
    # one per configuration in a process: each boto3 client costs ~0.3 s
    uri = settings.uri
    if uri.startswith("s3://"):
        return S3Store(uri, endpoint_url=settings.endpoint_url, region=settings.region,
                       retry_seconds=settings.retry_seconds)
    if "://" in uri and not uri.startswith("file://"):
        raise LabtuneError(f"{uri}: unsupported store scheme (use a local path or s3://bucket/prefix)")  # a mistyped path: exit 2
    return LocalStore(uri.removeprefix("file://"))


def download_tree(store: Store, prefix: str, dest: Path) -> list[Path]:
    """Copy every object under prefix into dest (for sources without a labtune manifest).

    S3 objects are also kept in $LABTUNE_HOME/cache/objects by URI and ETag, so a folder of notes
    where one file changed downloads that one file again, not all of them (the watcher's retraining
    after each change reads thousands of unchanged notes otherwise)."""
    from concurrent.futures import ThreadPoolExecutor

    remote = isinstance(store, S3Store)
    items = store.list_with_etags(prefix) if remote else [(key, 0, "") for key in store.list(prefix)]
    cache = labtune_home() / "cache" / "objects"
    targets = []
    for key, size, etag in items:
        rel = key[len(prefix):].lstrip("/") if prefix else key
        target = dest / checked_key(rel, store.uri_for(key))  # a key with '..' never writes outside dest
        kept = cache / hashlib.sha256(f"{store.uri_for(key)}\0{etag}".encode()).hexdigest()[:40] if remote else None
        targets.append((key, target, kept, size))

    def fetch_one(item: tuple[str, Path, Path | None, int]) -> None:
        key, target, kept, size = item
        if kept is not None and kept.is_file() and kept.stat().st_size == size:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kept, target)
            return
        store.download(key, target)
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            partial = _partial(kept)
            shutil.copyfile(target, partial)
            os.replace(partial, kept)

    # many small objects (thousands of notes): their round trips overlap (boto3's client is thread-safe)
    with ThreadPoolExecutor(max_workers=16 if remote else 1) as pool:
        list(pool.map(fetch_one, targets))
    return [target for _, target, _, _ in targets]


def scratch_dir(prefix: str) -> Path:
    root = labtune_home() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))
