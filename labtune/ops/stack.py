"""The local stack: a Prefect server, an S3 endpoint, the two work pools, one process worker per
pool and the deployments, one command away (`labtune stack up|down|status`, `labtune deploy`).

Every process it starts is recorded in $LABTUNE_HOME/stack/stack.json, and `down` stops exactly
those (workers first: a worker whose server is gone ignores SIGTERM for a while).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from labtune.errors import LabtuneError, env_seconds
from labtune.ops import server
from labtune.store.backends import labtune_home

REPO = Path(__file__).resolve().parents[2]
POOLS = {"labtune-cpu": REPO / "infra" / "process-cpu.json", "labtune-gpu": REPO / "infra" / "process-gpu.json"}
GPU_POOL_CONCURRENCY = 1  # one training at a time on this host's GPUs
FAST_POLLING = {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
UNRESPONSIVE_AUTOMATION = "labtune: crash unresponsive flow runs"
# flow runs send a heartbeat every 30 s (the pools' PREFECT_FLOWS_HEARTBEAT_FREQUENCY): three missed
# ones mean the machine or its worker died
DEFAULT_UNRESPONSIVE_SECONDS = 90


def stack_dir() -> Path:
    return labtune_home() / "stack"


def _state() -> dict[str, Any]:
    path = stack_dir() / "stack.json"
    return json.loads(path.read_text()) if path.is_file() else {"processes": {}}


def _save(state: dict[str, Any]) -> None:
    stack_dir().mkdir(parents=True, exist_ok=True)
    (stack_dir() / "stack.json").write_text(json.dumps(state, indent=2))


def _prefect(args: list[str], api_url: str, cwd: Path = REPO, env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PREFECT_API_URL": api_url, **(env or {})})
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise LabtuneError(f"prefect {' '.join(args[:3])} failed: {' / '.join(tail)}")
    return proc


def create_pools(api_url: str) -> list[str]:
    """The CPU and GPU process pools from infra/*.json (created or updated), and the GPU pool's
    concurrency limit."""
    for name, template in POOLS.items():
        _prefect(["work-pool", "create", name, "--type", "process", "--base-job-template", str(template), "--overwrite"],
                 api_url)
    _prefect(["work-pool", "set-concurrency-limit", "labtune-gpu", str(GPU_POOL_CONCURRENCY)], api_url)
    ensure_unresponsive_run_automation(api_url)
    return list(POOLS)


def ensure_unresponsive_run_automation(api_url: str, seconds: float | None = None) -> str:
    """Prefect's zombie-run automation for a self-hosted server: a run of a labtune deployment
    whose heartbeats stop (its worker or machine died) is marked Crashed after `seconds`, which
    frees the GPU pool's slot and lets a re-run resume from the last checkpoint. Replaced when it
    exists; returns its id."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.settings import PREFECT_API_URL, temporary_settings

    seconds = float(seconds or env_seconds("LABTUNE_UNRESPONSIVE_SECONDS", DEFAULT_UNRESPONSIVE_SECONDS))
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        try:
            Automation.read(name=UNRESPONSIVE_AUTOMATION).delete()
        except ValueError:
            pass
        automation = Automation(
            name=UNRESPONSIVE_AUTOMATION,
            description=f"Marks a flow run Crashed when it sends no heartbeat for {seconds:g} s (its worker or machine died).",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                        "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                # only runs of labtune's deployments: their pools send a heartbeat every 30 s, where
                # Prefect's default is 180 s
                match_related=ResourceSpecification({"prefect.resource.role": "tag",
                                                     "prefect.resource.id": "prefect.tag.labtune"}),
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=seconds),
            ),
            actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                        message=f"no heartbeat for {seconds:g} s: its worker or machine died; "
                                                "re-run the deployment to resume from the last checkpoint")],
        ).create()
    return str(automation.id)


def start_worker(pool: str, api_url: str) -> int:
    """A process worker for pool, polling every second; returns its PID (recorded)."""
    stack_dir().mkdir(parents=True, exist_ok=True)
    log_path = stack_dir() / f"worker-{pool}.log"
    env = {**os.environ, "PREFECT_API_URL": api_url, **FAST_POLLING, "LABTUNE_REPO": str(REPO),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                                 "--name", f"{pool}-{os.uname().nodename}"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
                                start_new_session=True)
    state = _state()
    state["processes"][f"worker-{pool}"] = {"pid": proc.pid, "log": str(log_path)}
    _save(state)
    return proc.pid


def wait_for_workers(api_url: str, pools: list[str], timeout: float = 90.0) -> dict[str, str]:
    """Wait until every pool has an online worker (its first heartbeat); {pool: worker name}."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    online: dict[str, str] = {}
    deadline = time.time() + timeout
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while len(online) < len(pools):
            for pool in pools:
                workers = [w for w in client.read_workers_for_work_pool(pool) if str(w.status).upper().endswith("ONLINE")]
                if workers:
                    online[pool] = workers[0].name
            if len(online) < len(pools):
                if time.time() > deadline:
                    missing = sorted(set(pools) - set(online))
                    raise LabtuneError(f"no worker came online for {missing} within {timeout:.0f}s; see {stack_dir()}/worker-*.log")
                time.sleep(0.5)
    return online


def start_s3(port: int) -> str:
    """A moto S3 server on 127.0.0.1:port whose objects survive a restart (kept under
    $LABTUNE_HOME/stack/s3/); for trying labtune out: MinIO or AWS for real use."""
    from labtune.store import local_s3

    url = f"http://127.0.0.1:{port}"
    if local_s3.is_up(url):
        return url
    if local_s3.port_taken(port):
        raise LabtuneError(f"--s3-port {port}: 127.0.0.1:{port} is taken by something that is not an S3 endpoint; "
                           "give another port")
    stack_dir().mkdir(parents=True, exist_ok=True)
    proc = local_s3.start(port, stack_dir() / "s3", log_path=stack_dir() / "s3.log")
    state = _state()
    state["processes"]["s3"] = {"pid": proc.pid, "log": str(stack_dir() / "s3.log"), "url": url}
    _save(state)
    return url


def deploy(recipe_path: str, api_url: str) -> str:
    """Register the deployments of deployments/prefect.yaml for this recipe (its path is the
    runs' default parameter, its watch.cron the watcher's schedule)."""
    from labtune.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    env = {"LABTUNE_REPO": str(REPO), "LABTUNE_RECIPE": str(Path(recipe_path).resolve()),
           "LABTUNE_WATCH_CRON": recipe.watch.cron, "LABTUNE_WATCH_TIMEZONE": recipe.watch.timezone}
    proc = _prefect(["--no-prompt", "deploy", "--prefect-file", str(REPO / "deployments" / "prefect.yaml"), "--all"],
                    api_url, env=env)
    return proc.stdout


def up(recipe_path: str | None = None, port: int = server.DEFAULT_PORT, s3_port: int | None = 9000,
       say: Callable[[str], None] = print) -> dict[str, Any]:
    """Start what is not running yet, wait for health checks, and say what runs where."""
    started = time.time()
    url, new = server.start(port, say=say)
    say(f"Prefect server: {url.removesuffix('/api')} ({'started' if new else 'already running'}, "
        f"database {server.prefect_home() / 'prefect.db'})")
    if s3_port:
        say(f"S3 endpoint: {start_s3(s3_port)} (moto, objects kept in {stack_dir() / 's3'}; "
            f"set store.endpoint_url to it)")
    create_pools(url)
    say(f"work pools: {', '.join(POOLS)} (process; labtune-gpu concurrency limit {GPU_POOL_CONCURRENCY})")
    say(f"automation: '{UNRESPONSIVE_AUTOMATION}' (a labtune run without a heartbeat for "
        f"{env_seconds('LABTUNE_UNRESPONSIVE_SECONDS', DEFAULT_UNRESPONSIVE_SECONDS):g} s is marked Crashed)")
    state = _state()
    for pool in POOLS:
        entry = state["processes"].get(f"worker-{pool}", {})
        pid = entry["pid"] if server.process_alive(entry.get("pid")) else start_worker(pool, url)
        say(f"worker for {pool}: pid {pid}, log {stack_dir() / f'worker-{pool}.log'}")
    wait_for_workers(url, list(POOLS))
    say("workers: online")
    if recipe_path:
        deploy(recipe_path, url)
        set_schedules(url, active=True)  # `stack down` paused them
        say(f"deployments: finetune/labtune-finetune, train/labtune-train, evaluate/labtune-evaluate, "
            f"synthesize/labtune-synthesize, watch-lab-notes/labtune-watch-lab-notes (recipe {recipe_path})")
    say(f"stack up in {time.time() - started:.1f}s; stop it with: labtune stack down")
    return status(port)


DEPLOYMENT_PREFIX = "labtune-"  # deployments/prefect.yaml names every deployment so


def set_schedules(api_url: str, active: bool) -> int:
    """Resume (stack up) or pause (stack down) labtune's deployments; pausing also deletes their
    scheduled flow runs, so a server left running (or started again by `labtune run`) holds no
    runs that no worker will take. Returns the scheduled runs deleted."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, \
        FlowRunFilterStateType

    with server.using_api(api_url), get_client(sync_client=True) as client:
        ours = [d for d in client.read_deployments() if d.name.startswith(DEPLOYMENT_PREFIX)]

        def scheduled() -> list:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id for d in ours])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"]))))

        before = scheduled() if ours and not active else []
        for deployment in ours:
            (client.resume_deployment if active else client.pause_deployment)(deployment.id)
        for run in scheduled() if before else []:  # the server drops a paused deployment's own; any left go here
            client.delete_flow_run(run.id)
        return len(before)


def down(say: Callable[[str], None] = print, timeout: float = 30.0, keep_server: bool = False) -> list[str]:
    """Pause labtune's deployments and delete their scheduled runs, then stop the workers, the S3
    endpoint and the server: exactly the recorded processes."""
    state = _state()
    stopped = []
    recorded = server.status()
    url = recorded["api_url"] if recorded["healthy"] else os.environ.get("PREFECT_API_URL")
    if url and server.healthy(url):
        deleted = set_schedules(url, active=False)
        if deleted:
            say(f"deleted {deleted} scheduled flow run(s) of labtune's deployments (paused until the next stack up)")
    names = sorted(state["processes"], key=lambda n: (not n.startswith("worker-"), n))
    for name in names:
        pid = state["processes"][name]["pid"]
        if server.process_alive(pid):
            os.killpg(pid, signal.SIGTERM)
            deadline = time.time() + timeout
            while server.process_alive(pid) and time.time() < deadline:
                time.sleep(0.2)
            if server.process_alive(pid):
                os.killpg(pid, signal.SIGKILL)
            stopped.append(name)
            say(f"stopped {name} (pid {pid})")
        del state["processes"][name]
    _save(state)
    if not keep_server and server.stop():
        stopped.append("server")
        say("stopped the Prefect server")
    return stopped


def status(port: int = server.DEFAULT_PORT) -> dict[str, Any]:
    state = _state()
    processes = {name: {**entry, "running": server.process_alive(entry.get("pid"))} for name, entry in state["processes"].items()}
    return {"server": server.status(port), "processes": processes}
