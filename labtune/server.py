"""A local Prefect server in the background, its database under the labtune home folder.

`labtune run` uses the server named by PREFECT_API_URL when set; otherwise it starts (or reuses)
one on 127.0.0.1:4200 and records its PID, so `labtune server stop` stops exactly that process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from labtune.errors import RunFailure
from labtune.store import labtune_home

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
    except OSError:
        return False


def _read_pid() -> int | None:
    try:
        pid = int(pid_file().read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    return pid


def start(port: int = DEFAULT_PORT, host: str = "127.0.0.1", timeout: float = 120.0) -> tuple[str, bool]:
    """(api url, started now). Reuses a healthy server already listening on host:port."""
    url = api_url(port, host)
    if healthy(url):
        return url, False
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_URL=f"http://{host}:{port}", PREFECT_SERVER_API_HOST=host, PREFECT_SERVER_API_PORT=str(port))
    env.pop("PREFECT_API_URL", None)
    log_path = home / "server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
    pid_file().write_text(str(proc.pid))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if healthy(url):
            return url, True
        if proc.poll() is not None:
            raise RunFailure(f"Prefect server exited with code {proc.returncode}; see {log_path}")
        time.sleep(0.5)
    raise RunFailure(f"Prefect server did not become healthy on {url} within {timeout:.0f}s; see {log_path}")


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
    url = api_url(port, host)
    return {"api_url": url, "ui_url": url.removesuffix("/api"), "healthy": healthy(url), "pid": _read_pid(),
            "home": str(prefect_home())}


def ensure_api(port: int = DEFAULT_PORT, say=print) -> str:
    """Point this process at a Prefect API, starting a local server when none is configured."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        if not healthy(configured, timeout=5):
            raise RunFailure(f"PREFECT_API_URL {configured}: Prefect server is not answering")
        return configured
    url, started = start(port)
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
