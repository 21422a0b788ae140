"""A local Prefect server in the background, its database under the labtune home folder.

`labtune run` uses the server named by PREFECT_API_URL when set; otherwise it reuses the server
this labtune home started, or starts one on 127.0.0.1:4200 (the next free port when something
else listens there: another project's Prefect server is never used unasked) and records its pid
and port once it answers, so `labtune server stop` and `server status` speak of exactly that
process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from labtune.errors import LabtuneError, RunFailure
from labtune.store.backends import labtune_home

DEFAULT_PORT = 4200


def prefect_home() -> Path:
    return labtune_home() / "prefect"


def pid_file() -> Path:
    return prefect_home() / "server.pid"


def api_url(port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{port}/api"


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def _recorded() -> tuple[int, int] | None:
    """(pid, port) of the server this labtune home started, while that process runs."""
    try:
        text = pid_file().read_text().strip()
        entry = json.loads(text) if text.startswith("{") else {"pid": int(text), "port": DEFAULT_PORT}
        pid, port = int(entry["pid"]), int(entry["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pid, port) if process_alive(pid) else None


def _read_pid() -> int | None:
    recorded = _recorded()
    return recorded[0] if recorded else None


def listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, port)) == 0


def listener(port: int) -> str:
    """What listens on a local TCP port, as "pid N (command line)" where /proc tells (Linux), else
    "another program"."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(fields[9])
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in {f"socket:[{inode}]" for inode in inodes}:
                    command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"pid {proc.name} ({command[:120]})"
    return "another program"


def free_port_from(port: int, host: str = "127.0.0.1", tries: int = 50) -> int:
    for candidate in range(port + 1, port + 1 + tries):
        if not listening(candidate, host):
            return candidate
    raise RunFailure(f"no free port for a Prefect server on {host} between {port + 1} and {port + tries}")


def start(port: int = DEFAULT_PORT, host: str = "127.0.0.1", timeout: float = 120.0,
          say=None) -> tuple[str, bool]:
    """(api url, started now). Reuses the server this labtune home started when it answers; a
    port taken by anything else (another project's Prefect server included) is named, and
    labtune's own server starts on the next free port. The pid file is written once the new
    server answers, never for one that died."""
    recorded = _recorded()
    if recorded:  # ours runs: use it (it may still be starting), never start a second one beside it
        deadline = time.time() + timeout
        while time.time() < deadline:
            if healthy(api_url(recorded[1], host)):
                return api_url(recorded[1], host), False
            if not process_alive(recorded[0]):
                break
            time.sleep(0.5)
        else:
            raise RunFailure(f"the Prefect server labtune started (pid {recorded[0]}, port {recorded[1]}) is not answering; "
                             f"stop it with `labtune server stop` and try again")
    if listening(port, host):
        other = "a Prefect server labtune did not start" if healthy(api_url(port, host)) else "a program that is not Prefect"
        chosen = free_port_from(port, host)
        (say or (lambda line: None))(
            f"port {port} on {host} is taken by {other}, {listener(port)}; labtune uses it only if PREFECT_API_URL "
            f"names it. Starting labtune's own Prefect server on port {chosen}.")
        port = chosen
    url = api_url(port, host)
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_URL=f"http://{host}:{port}", PREFECT_SERVER_API_HOST=host, PREFECT_SERVER_API_PORT=str(port))
    env.pop("PREFECT_API_URL", None)
    log_path = home / "server.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
    deadline = time.time() + timeout
    while time.time() < deadline:
        if healthy(url):
            pid_file().write_text(json.dumps({"pid": proc.pid, "port": port, "host": host}))
            return url, True
        if proc.poll() is not None:
            raise RunFailure(f"Prefect server exited with code {proc.returncode} on {host}:{port}: "
                             f"{_reason(log_path, offset)} (see {log_path})")
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    raise RunFailure(f"Prefect server did not become healthy on {url} within {timeout:.0f}s; see {log_path}")


def _reason(path: Path, offset: int) -> str:
    """Why a server that just exited did: the last error line it wrote, else its last line."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as log:
            log.seek(offset)
            lines = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower() and not line.startswith("File ")]
        return (errors or lines or ["no output"])[-1][:200]
    return "no output"


def process_alive(pid: int | None) -> bool:
    """Whether pid runs; one that this process started and that has exited (a zombie until
    reaped) counts as gone, and is reaped."""
    if not pid:
        return False
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def stop(timeout: float = 30.0) -> bool:
    """Stop the server this labtune home started; False when none was running."""
    pid = _read_pid()
    if pid is None:
        pid_file().unlink(missing_ok=True)
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while process_alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    if process_alive(pid):
        os.killpg(pid, signal.SIGKILL)
    pid_file().unlink(missing_ok=True)
    return True


def status(port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> dict[str, object]:
    """The server this labtune home started (what `server stop` stops), and, when none runs,
    whatever else answers on the port."""
    recorded = _recorded()
    url = api_url(recorded[1] if recorded else port, host)
    result: dict[str, object] = {"api_url": url, "ui_url": url.removesuffix("/api"),
                                 "healthy": bool(recorded) and healthy(url), "pid": recorded[0] if recorded else None,
                                 "started_by_labtune": bool(recorded), "home": str(prefect_home())}
    if not recorded and listening(port, host):
        what = "a Prefect server" if healthy(url) else "a program that is not Prefect"
        result["other"] = (f"{what} labtune did not start listens on {host}:{port}, {listener(port)}; "
                           f"labtune uses it only if PREFECT_API_URL names it")
    return result


def ensure_api(port: int = DEFAULT_PORT, say=print) -> str:
    """Point this process at a Prefect API, starting a local server when none is configured."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        parsed = urllib.parse.urlsplit(configured)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise LabtuneError(f"PREFECT_API_URL {configured!r}: not an http(s) URL; e.g. http://127.0.0.1:4200/api")
        if not healthy(configured, timeout=5):
            raise RunFailure(f"PREFECT_API_URL {configured}: Prefect server is not answering")
        return configured
    url, started = start(port, say=say)
    os.environ["PREFECT_API_URL"] = url
    ui = url.removesuffix("/api")
    if started:
        say(f"Started a Prefect server in the background (database in {prefect_home()}).")
    say(f"Prefect UI: {ui}  (stop the server with: labtune server stop)")
    return url


@contextlib.contextmanager
def using_api(url: str) -> Iterator[None]:
    """Flows started in this block talk to the Prefect API at url."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield
