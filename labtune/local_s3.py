"""A local S3 endpoint (moto's server) that keeps its objects across restarts.

moto holds everything in memory, so a restarted server would come back empty, unlike MinIO or
AWS. Its request recorder appends every request it serves to `requests.jsonl`; on start the
log is compacted (reads, and writes later overwritten, dropped) and replayed into the fresh
server before recording resumes. For trying labtune out and for tests; MinIO or AWS for real use.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from labtune.errors import LabtuneError

REQUESTS_LOG = "requests.jsonl"
_WRITES = {"PUT", "POST", "DELETE"}


def moto_binary() -> Path:
    binary = Path(sys.executable).with_name("moto_server")
    if not binary.is_file():
        raise LabtuneError("moto_server is not installed (pip install 'moto[server]'); "
                           "or point store.endpoint_url at MinIO or AWS")
    return binary


def is_up(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/", timeout=1)
        return True
    except OSError:
        return False


def _body(entry: dict[str, Any]) -> bytes:
    body = entry.get("body") or ""
    return base64.b64decode(body) if entry.get("body_encoded") else body.encode()


def _plain_put(entry: dict[str, Any]) -> bool:
    """A whole-object PutObject (not a multipart part, a copy or a bucket-level call)."""
    split = urlsplit(entry["url"])
    headers = {k.lower() for k in entry.get("headers", {})}
    return (entry["method"] == "PUT" and not split.query and "x-amz-copy-source" not in headers
            and split.path.strip("/").count("/") >= 1)


def compact(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The writes that rebuild the state: reads dropped, and requests cut short (body shorter than
    its Content-Length: the client went away) and object PUTs later overwritten or deleted."""
    writes = []
    for entry in entries:
        if entry.get("method") not in _WRITES:
            continue
        length = {k.lower(): v for k, v in entry.get("headers", {}).items()}.get("content-length")
        if length is not None and int(length) != len(_body(entry)):
            continue
        writes.append(entry)
    last_write: dict[str, int] = {}
    for index, entry in enumerate(writes):
        split = urlsplit(entry["url"])
        if _plain_put(entry) or (entry["method"] == "DELETE" and not split.query):
            last_write[split.path] = index
    return [entry for index, entry in enumerate(writes)
            if not _plain_put(entry) or last_write[urlsplit(entry["url"]).path] == index]


def read_log(path: Path) -> list[dict[str, Any]]:
    """The recorded requests. moto's recorder writes an entry and its newline in two writes, so
    two requests served at once (the parts of a multipart upload) can share a line: every entry
    on a line is read. An entry cut short by a killed server is skipped."""
    decoder = json.JSONDecoder()
    entries = []
    if path.is_file():
        for line in path.read_text().splitlines():
            position = 0
            while position < len(line):
                try:
                    entry, position = decoder.raw_decode(line, position)
                except json.JSONDecodeError:
                    break
                entries.append(entry)
                while position < len(line) and line[position].isspace():
                    position += 1
    return entries


def replay(entries: list[dict[str, Any]], url: str) -> int:
    """Send the recorded writes to the server at url, in order. Multipart upload ids are the new
    server's: each CreateMultipartUpload's new id replaces the recorded one in its later parts."""
    new_ids: dict[str, str] = {}
    pending: dict[str, str] = {}
    target = urlsplit(url)
    sent = 0
    for entry in entries:
        split = urlsplit(entry["url"])
        query = parse_qs(split.query, keep_blank_values=True)
        if "uploadId" in query:
            old = query["uploadId"][0]
            if old not in new_ids and split.path in pending:
                new_ids[old] = pending.pop(split.path)
            query["uploadId"] = [new_ids.get(old, old)]
        path = urlunsplit(("", "", split.path, urlencode(query, doseq=True), ""))
        # no 100-continue handshake on a replay: the body goes with the headers
        headers = {k: v for k, v in entry.get("headers", {}).items()
                   if k.lower() not in ("host", "transfer-encoding", "connection", "expect")}
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        try:
            connection.request(entry["method"], path, body=_body(entry), headers=headers)
            response = connection.getresponse()
            answer = response.read()
        finally:
            connection.close()
        if response.status >= 300:
            continue  # it failed when first made too (a bucket that existed, an aborted upload)
        sent += 1
        if entry["method"] == "POST" and "uploads" in query:
            match = re.search(rb"<UploadId>([^<]+)</UploadId>", answer)
            if match:
                pending[split.path] = match.group(1).decode()
    return sent


def start(port: int, state_dir: Path, log_path: Path | None = None, timeout: float = 30.0) -> subprocess.Popen:
    """moto_server on 127.0.0.1:port with the objects recorded under state_dir restored."""
    state_dir.mkdir(parents=True, exist_ok=True)
    requests_log = state_dir / REQUESTS_LOG
    writes = compact(read_log(requests_log))
    tmp = requests_log.with_name(REQUESTS_LOG + ".part")
    tmp.write_text("".join(json.dumps(entry) + "\n" for entry in writes))
    os.replace(tmp, requests_log)
    url = f"http://127.0.0.1:{port}"
    if is_up(url):
        raise LabtuneError(f"{url}: something already listens there; stop it or choose another port")
    env = {**os.environ, "MOTO_RECORDER_FILEPATH": str(requests_log)}
    env.pop("MOTO_ENABLE_RECORDING", None)  # off while replaying, or the replay would be recorded twice
    output = open(log_path or state_dir / "server.log", "ab")
    proc = subprocess.Popen([str(moto_binary()), "-H", "127.0.0.1", "-p", str(port)], stdout=output,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    output.close()
    deadline = time.time() + timeout
    while not is_up(url):
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise LabtuneError(f"S3 endpoint did not start on {url}; see {log_path or state_dir / 'server.log'}")
        time.sleep(0.1)
    replay(writes, url)
    urllib.request.urlopen(urllib.request.Request(url + "/moto-api/recorder/start-recording", method="POST"),
                           timeout=10).read()
    return proc
