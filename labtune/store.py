"""The artifact store: a local directory (the embedded default) or S3 through boto3.

Keys are `/`-separated paths under the store's root. Both backends speak the same small
interface; S3 works against AWS, MinIO or any S3-compatible endpoint via `endpoint_url`.
Credentials are boto3's business (environment, profile, role) and never appear in messages.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from labtune.errors import LabtuneError

MiB = 1024 * 1024


class StoreError(LabtuneError):
    """A store operation failed; the message is one line naming the URI."""


def labtune_home() -> Path:
    return Path(os.environ.get("LABTUNE_HOME", "~/.labtune")).expanduser()


def sha256_file(path: str | os.PathLike, chunk: int = 8 * MiB) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_WRITTEN: dict[tuple[str, int, int], str] = {}


def _stat_key(path: str | os.PathLike) -> tuple[str, int, int]:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def remember_sha256(path: str | os.PathLike, digest: str) -> None:
    """Record the digest of a file this process just wrote (hashed while writing it)."""
    _WRITTEN[_stat_key(path)] = digest


def output_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file about to be committed: hashed while it was written when possible."""
    return _WRITTEN.get(_stat_key(path)) or sha256_file(path)


def source_sha256(path: str | os.PathLike) -> str:
    """sha256 of a source file, remembered under $LABTUNE_HOME by path, size, mtime and inode, so
    a multi-GB base model is not re-read on every run (touching or replacing it re-hashes)."""
    st = os.stat(path)
    real = os.path.realpath(path)
    record = labtune_home() / "cache" / "sha256" / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")
    stamp = {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    saved = _remembered(record)
    if saved is not None and {k: saved.get(k) for k in stamp} == stamp and "sha256" in saved:
        return saved["sha256"]
    digest = sha256_file(path)
    if st.st_size >= 16 * MiB:  # small files are cheaper to hash than to look up
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(record.name + f".{os.getpid()}.part")
        tmp.write_text(json.dumps({**stamp, "sha256": digest}))
        os.replace(tmp, record)
    return digest


def _remembered(record: Path) -> dict | None:
    """A digest record, or None when there is none (or it is unreadable: then it is rewritten)."""
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def sha256_files(paths: list[Path], cached: bool = True) -> dict[str, str]:
    """{name: sha256} of several files, hashed in parallel (hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    digest = source_sha256 if cached else sha256_file
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1, max(1, len(paths)))) as pool:
        return dict(zip([p.name for p in paths], pool.map(digest, paths)))


def checked_key(key: str, where: str) -> str:
    """A store key that stays under its store's folder or prefix: no absolute paths, no `..`."""
    if key.startswith(("/", "\\")) or ".." in key.replace("\\", "/").split("/"):
        raise StoreError(f"{where}: key {key!r} escapes the store (absolute path or '..')")
    return key


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
        tmp = target.with_name(target.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def upload(self, local: str | os.PathLike, key: str) -> None:
        target = self._path(key)
        if target.exists() and os.path.samefile(local, target):
            return  # built in place
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        shutil.copyfile(local, tmp)
        os.replace(tmp, target)

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

    def delete(self, key: str) -> None:
        (self._path(key)).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)


class S3Store:
    def __init__(self, uri: str, endpoint_url: str | None = None, region: str | None = None):
        if not uri.startswith("s3://"):
            raise StoreError(f"{uri}: not an s3:// URI")
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise StoreError(f"{uri}: no bucket named")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

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

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail(exc, key) from None
        except Exception as exc:
            raise self._fail(exc, key) from None

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as exc:
            raise self._fail(exc, key) from None

    def write_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as exc:
            raise self._fail(exc, key) from None

    def upload(self, local: str | os.PathLike, key: str) -> None:
        try:
            self.client.upload_file(str(local), self.bucket, self._key(key), Config=self.transfer)
        except Exception as exc:
            raise self._fail(getattr(exc, "last_exception", None) or exc, key) from None

    def download(self, key: str, local: str | os.PathLike) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(local), Config=self.transfer)
        except Exception as exc:
            raise self._fail(exc, key) from None

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
        try:
            return sorted(key for key, _, _ in self._iter_objects(prefix))
        except Exception as exc:
            raise self._fail(exc, prefix) from None

    def list_with_etags(self, prefix: str) -> list[tuple[str, int, str]]:
        """(key, size, ETag) of every object under prefix: a cheap identity for a source."""
        try:
            return sorted(self._iter_objects(prefix))
        except Exception as exc:
            raise self._fail(exc, prefix) from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._fail(exc, key) from None

    def delete_prefix(self, prefix: str) -> None:
        keys = [self._key(k) for k in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                raise StoreError(f"{self.uri}: bucket {self.bucket!r} does not exist") from None
            raise self._fail(exc) from None


Store = LocalStore | S3Store


@functools.lru_cache(maxsize=16)
def open_store(uri: str, endpoint_url: str | None = None, region: str | None = None) -> Store:
    """The store at uri; one per configuration in a process, since each boto3 client costs ~0.3 s."""
    if uri.startswith("s3://"):
        return S3Store(uri, endpoint_url=endpoint_url, region=region)
    if "://" in uri and not uri.startswith("file://"):
        raise StoreError(f"{uri}: unsupported store scheme (use a local path or s3://bucket/prefix)")
    return LocalStore(uri.removeprefix("file://"))


def download_tree(store: Store, prefix: str, dest: Path) -> list[Path]:
    """Copy every object under prefix into dest (for sources without a labtune manifest)."""
    paths = []
    for key in store.list(prefix):
        rel = key[len(prefix):].lstrip("/") if prefix else key
        target = dest / rel
        store.download(key, target)
        paths.append(target)
    return paths


def scratch_dir(prefix: str) -> Path:
    root = labtune_home() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def s3_options(recipe) -> dict[str, str | None]:
    """The recipe's S3 settings, for reading sources (models, data) that live on S3 too."""
    return {"endpoint_url": recipe.store.endpoint_url, "region": recipe.store.region}


def open_recipe_store(recipe) -> Store:
    """The store a recipe names (`store.uri`, `store.endpoint_url`, `store.region`)."""
    return open_store(recipe.store.uri, endpoint_url=recipe.store.endpoint_url, region=recipe.store.region)
