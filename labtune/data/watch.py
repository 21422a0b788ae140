"""Fingerprints of a lab-notes source, and what changed between two of them (no Prefect here).

A local folder is fingerprinted by its note files' relative names, sizes and sha256 (remembered
by path, size, mtime and inode, so an unchanged folder is not re-read); an `s3://` prefix by its
keys, sizes and ETags. The fingerprint is the sha256 of that sorted list. The last fingerprint a
watcher saw is kept in the store under `watch/<source id>/state.json`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

from labtune.data.notes import NOTE_SUFFIXES, UnsafePathError, note_files, safe_relative
from labtune.errors import LabtuneError
from labtune.store.backends import Store, StoreSettings, open_store
from labtune.store.hashing import source_sha256

__all__ = ["UnsafePathError", "changes", "fingerprint", "load_state", "note_listing", "safe_relative", "save_state",
           "source_id"]


def source_id(source: str) -> str:
    """A short, stable name for a notes source (its location, not its content)."""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def note_listing(source: str, settings: StoreSettings | None = None) -> list[dict[str, Any]]:
    """[{name, size, digest}] of every note file under a folder or s3:// prefix, sorted by name."""
    if source.startswith("s3://"):
        store = open_store(settings.at(source) if settings else StoreSettings(source))
        listing = []
        for key, size, etag in store.list_with_etags(""):
            if PurePosixPath(key).suffix.lower() in NOTE_SUFFIXES:
                listing.append({"name": safe_relative(key, source), "size": size, "digest": f"etag:{etag}"})
        return sorted(listing, key=lambda item: item["name"])
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise LabtuneError(f"{source}: lab-notes folder not found")
    listing = []
    for path in note_files(folder):
        name = safe_relative(path.relative_to(folder).as_posix(), source)
        listing.append({"name": name, "size": path.stat().st_size, "digest": f"sha256:{source_sha256(path)}"})
    return listing


def fingerprint(listing: list[dict[str, Any]]) -> str:
    blob = json.dumps([[i["name"], i["size"], i["digest"]] for i in listing], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def changes(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Files added, changed and removed between two listings."""
    old = {i["name"]: (i["size"], i["digest"]) for i in before}
    new = {i["name"]: (i["size"], i["digest"]) for i in after}
    return {"added": sorted(set(new) - set(old)), "removed": sorted(set(old) - set(new)),
            "changed": sorted(n for n in set(old) & set(new) if old[n] != new[n])}


def load_state(store: Store, source: str) -> dict[str, Any] | None:
    key = f"watch/{source_id(source)}/state.json"
    return json.loads(store.read_bytes(key)) if store.exists(key) else None


def save_state(store: Store, source: str, state: dict[str, Any]) -> None:
    store.write_bytes(f"watch/{source_id(source)}/state.json", json.dumps(state, indent=2).encode())
