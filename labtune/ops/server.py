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
    server answers, never for one that died.

    One server per labtune home however many runs start at once: starting it (and its database's
    first migration) happens under a lock on the home's prefect folder, and a run that finds
    another starting one waits for the lock, then finds that server recorded and uses it."""
    import fcntl

    prefect_home().mkdir(parents=True, exist_ok=True)
    with open(prefect_home() / "server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        return _start(port, host, timeout, say)


def _start(port: int, host: str, timeout: float, say) -> tuple[str, bool]:
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
        _crashed_orphans(configured, say)
        return configured
    url, started = start(port, say=say)
    os.environ["PREFECT_API_URL"] = url
    _crashed_orphans(url, say)
    ui = url.removesuffix("/api")
    if started:
        say(f"Started a Prefect server in the background (database in {prefect_home()}).")
    say(f"Prefect UI: {ui}  (stop the server with: labtune server stop)")
    return url


def _crashed_orphans(url: str, say) -> None:
    with contextlib.suppress(Exception):  # housekeeping: never the reason a command fails
        with using_api(url):
            gone = mark_orphans_crashed()
        if gone:
            say(f"marked Crashed: flow run(s) {', '.join(gone)} (the labtune process that ran them was killed)")


@contextlib.contextmanager
def using_api(url: str) -> Iterator[None]:
    """Flows started in this block talk to the Prefect API at url."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


# --- flow runs whose process is gone --------------------------------------------------------

def process_tag(pid: int | None = None) -> str:
    """The tag every flow run a labtune command starts carries: this host and process."""
    return f"labtune-pid:{socket.gethostname()}:{pid or os.getpid()}"


def _flow_runs(states: list[str], tag: str | None = None) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags

    wanted = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states)),
                           tags=FlowRunFilterTags(all_=[tag]) if tag else None)
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=wanted, limit=200)


def _force_state(runs: list, state) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for run in runs:
            client.set_flow_run_state(run.id, state.model_copy(), force=True)


@contextlib.contextmanager
def tracked_runs() -> Iterator[None]:
    """Flow runs started in the block carry this process's tag. Ctrl-C marks them Cancelled (Prefect
    alone calls an interrupted run Crashed), and a later labtune command marks Crashed those of a
    process that died without a word (`kill -9`): mark_orphans_crashed."""
    from prefect import tags
    from prefect.states import Cancelled

    tag = process_tag()
    try:
        with tags(tag):
            yield
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):  # the server may be going down with us: the line still prints
            _force_state(_flow_runs(["RUNNING", "PENDING", "CRASHED", "SCHEDULED"], tag),
                         Cancelled(message="interrupted (Ctrl-C) in the labtune command that started it"))
        raise


def mark_orphans_crashed() -> list[str]:
    """Flow runs still RUNNING whose labtune process on this host is gone (killed with -9, a
    closed terminal) are marked Crashed; returns their names."""
    from prefect.states import Crashed

    host = f"labtune-pid:{socket.gethostname()}:"
    orphans = [run for run in _flow_runs(["RUNNING", "PENDING"])
               if any(t.startswith(host) and t[len(host):].isdigit() and not process_alive(int(t[len(host):]))
                      for t in run.tags)]
    _force_state(orphans, Crashed(message="the labtune process that ran it is gone (killed); marked by the next labtune command"))
    return [run.name for run in orphans]
