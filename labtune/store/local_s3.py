"""A local S3 endpoint (moto's server) that keeps its objects across restarts.

moto holds everything in memory, so a restarted server would come back empty, unlike MinIO or
AWS. Its request recorder appends every request it serves to `requests.jsonl`; on start the
log is compacted (reads, and writes later overwritten, dropped) and replayed into the fresh
server, in its own process and before its port is bound: a client retrying through the restart
meets a refused connection until every bucket and object is back, never an empty server (a
run's checkpoint upload once got "bucket does not exist" from a half-restored one). For trying
labtune out and for tests; MinIO or AWS for real use.

    python -m labtune.store.local_s3 --port 9000 --state-dir ~/.labtune/stack/s3
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from labtune.errors import LabtuneError

REQUESTS_LOG = "requests.jsonl"
_WRITES = {"PUT", "POST", "DELETE"}


def require_moto() -> None:
    import importlib.util

    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("werkzeug") is None:
        raise LabtuneError("moto's server is not installed (pip install 'moto[server]'); "
                           "or point store.endpoint_url at MinIO or AWS")


def is_up(url: str) -> bool:
    """An S3 endpoint answers at url (an S3 bucket listing, not any web page)."""
    try:
        with urllib.request.urlopen(url + "/", timeout=1) as response:
            return b"ListAllMyBucketsResult" in response.read(4096)
    except OSError:
        return False


def port_taken(port: int) -> bool:
    """Something listens on 127.0.0.1:port."""
    import socket

    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


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


Send = Callable[[str, str, bytes, dict[str, str]], tuple[int, bytes]]


def replay(entries: list[dict[str, Any]], send: Send) -> int:
    """Send the recorded writes, in order. Multipart upload ids are the new server's: each
    CreateMultipartUpload's new id replaces the recorded one in its later parts."""
    new_ids: dict[str, str] = {}
    pending: dict[str, str] = {}
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
                   if k.lower() not in ("transfer-encoding", "connection", "expect")}
        status, answer = send(entry["method"], path, _body(entry), headers)
        if status >= 300:
            continue  # it failed when first made too (a bucket that existed, an aborted upload)
        sent += 1
        if entry["method"] == "POST" and "uploads" in query:
            match = re.search(rb"<UploadId>([^<]+)</UploadId>", answer)
            if match:
                pending[split.path] = match.group(1).decode()
    return sent


def serve(port: int, state_dir: Path) -> None:
    """Restore the recorded objects into a fresh moto application, start recording, and only then
    bind 127.0.0.1:port. Runs until killed."""
    requests_log = state_dir / REQUESTS_LOG
    os.environ["MOTO_RECORDER_FILEPATH"] = str(requests_log)
    os.environ.pop("MOTO_ENABLE_RECORDING", None)  # off while replaying, or the replay would be recorded twice
    from moto.moto_api import recorder
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple
    from werkzeug.test import Client

    os.environ.setdefault("MOTO_PORT", str(port))
    app = DomainDispatcherApplication(create_backend_app)
    client = Client(app)

    def send(method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        headers = {**headers, "Host": f"127.0.0.1:{port}"}
        response = client.open(path, method=method, data=body, headers=headers)
        return response.status_code, response.get_data()

    restored = replay(read_log(requests_log), send)
    print(f"restored {restored} recorded writes from {requests_log}", flush=True)
    recorder.start_recording()
    run_simple("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)


def start(port: int, state_dir: Path, log_path: Path | None = None, timeout: float = 60.0) -> subprocess.Popen:
    """A local S3 endpoint on 127.0.0.1:port with the objects recorded under state_dir restored;
    it answers only once they are all back."""
    require_moto()
    state_dir.mkdir(parents=True, exist_ok=True)
    requests_log = state_dir / REQUESTS_LOG
    writes = compact(read_log(requests_log))
    tmp = requests_log.with_name(REQUESTS_LOG + ".part")
    tmp.write_text("".join(json.dumps(entry) + "\n" for entry in writes))
    os.replace(tmp, requests_log)
    url = f"http://127.0.0.1:{port}"
    if is_up(url):
        raise LabtuneError(f"{url}: something already listens there; stop it or choose another port")
    with open(log_path or state_dir / "server.log", "ab") as output:
        proc = subprocess.Popen([sys.executable, "-m", "labtune.store.local_s3", "--port", str(port),
                                 "--state-dir", str(state_dir)],
                                stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not is_up(url):
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise LabtuneError(f"S3 endpoint did not start on {url}; see {log_path or state_dir / 'server.log'}")
        time.sleep(0.1)
    return proc


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="a local S3 endpoint (moto) that keeps its objects across restarts")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    arguments = parser.parse_args()
    serve(arguments.port, arguments.state_dir)
