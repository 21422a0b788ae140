"""Content hashes: of files this process wrote (remembered while writing them) and of source files
(remembered under $LABTUNE_HOME by path, size, mtime and inode, so a large base model is read once)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from labtune.store.backends import MiB, labtune_home


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
