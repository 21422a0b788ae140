"""Operations: `deploy`, the local `stack` and `server`, and the `store` (ls, gc)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from labtune.cli.common import (
    Endpoint,
    Json,
    Port,
    Recipe,
    app,
    err,
    example,
    print_table,
    server_app,
    short,
    stack_app,
    store_app,
)
from labtune.errors import LabtuneError


@app.command(epilog=example("labtune deploy examples/labnotes-smollm2.yaml"))
def deploy(recipe: Path = Recipe, port: int = Port) -> None:
    """Create the work pools and register the deployments (deployments/prefect.yaml) for a recipe."""
    from labtune.ops import stack
    from labtune.ops.server import ensure_api
    from labtune.recipe import load_recipe

    load_recipe(recipe)  # a bad recipe fails here, before Prefect is contacted
    url = ensure_api(port, say=err)
    stack.create_pools(url)
    print(stack.deploy(str(recipe), url).strip())


@stack_app.command("up", epilog=example("labtune stack up --recipe examples/labnotes-smollm2.yaml"))
def stack_up(recipe: Optional[str] = typer.Option(None, "--recipe", help="deploy the flows with this recipe as their default"),
             port: int = Port, s3_port: int = typer.Option(9000, "--s3-port", min=1, max=65535, help="port of the local S3 endpoint (moto)"),
             no_s3: bool = typer.Option(False, "--no-s3", help="no local S3 endpoint (MinIO or AWS instead)")) -> None:
    """Start the Prefect server, a local S3 endpoint, the work pools, their workers and the deployments."""
    from labtune.ops import stack

    if not no_s3 and s3_port == port:
        raise LabtuneError(f"--s3-port {s3_port}: the Prefect server's port (--port); give the S3 endpoint another")
    if recipe:
        from labtune.recipe import load_recipe

        load_recipe(recipe)
    stack.up(recipe, port=port, s3_port=None if no_s3 else s3_port, say=print)


@stack_app.command("down", epilog=example("labtune stack down"))
def stack_down() -> None:
    """Stop what `stack up` started (workers first, then the server and the S3 endpoint)."""
    from labtune.ops import stack

    if not stack.down(say=print):
        print("nothing from the labtune stack was running")


@stack_app.command("status", epilog=example("labtune stack status"))
def stack_status(port: int = Port) -> None:
    """The stack's processes and the server's health, as JSON."""
    from labtune.ops import stack

    print(json.dumps(stack.status(port), indent=2))


@server_app.command("start", epilog=example("labtune server start --port 4200"))
def server_start(port: int = Port) -> None:
    """Start a local Prefect server in the background (its UI at http://127.0.0.1:PORT)."""
    from labtune.ops import server

    url, started = server.start(port, say=err)
    print(f"Prefect server {'started' if started else 'already running'}: UI {url.removesuffix('/api')}, "
          f"API {url}; stop it with: labtune server stop")


@server_app.command("stop", epilog=example("labtune server stop"))
def server_stop() -> None:
    """Stop the Prefect server labtune started."""
    from labtune.ops import server

    print("Prefect server stopped" if server.stop() else "no Prefect server started by labtune is running")


@server_app.command("status", epilog=example("labtune server status"))
def server_status(port: int = Port) -> None:
    """The server's URL and health, as JSON."""
    from labtune.ops import server

    print(json.dumps(server.status(port), indent=2))


# --- the store --------------------------------------------------------------------------------

StoreUri = typer.Option("~/.labtune/store", "--store", help="the store: a folder or s3://bucket/prefix (a recipe's store.uri)")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "incomplete"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _existing_store(store_uri: str, endpoint_url: str | None):
    """The store at store_uri; a local folder that does not exist is a mistyped path, not an empty store."""
    from labtune.store.backends import open_store

    if "://" not in store_uri:
        folder = Path(store_uri).expanduser()
        if not folder.is_dir():
            raise LabtuneError(f"--store {store_uri}: " + ("not a folder" if folder.exists() else
                                                           "no such folder (no run has written a store there)"))
    store = open_store(store_uri, endpoint_url=endpoint_url)
    store.check()  # an unreachable endpoint fails here in seconds, as the stage commands' preflight does
    return store


@store_app.command("ls", epilog=example("labtune store ls --store s3://lab/labtune --recipe labnotes"))
def store_ls(store_uri: str = StoreUri, recipe: Optional[str] = typer.Option(None, "--recipe", help="only outputs runs of this recipe (its name) used"),
             endpoint_url: Optional[str] = Endpoint, as_json: bool = Json) -> None:
    """Every stage output and training's checkpoints: size, age, the runs that use it, and whether
    the latest run of a deployment (or of the CLI) still needs it."""
    from labtune.store.housekeeping import inventory

    store = _existing_store(store_uri, endpoint_url)
    now = time.time()
    listed = inventory(store, recipe)
    if as_json:
        print(json.dumps([{"uri": store.uri_for(o.prefix), "stage": o.stage, "size": o.size,
                           "age_seconds": None if o.created is None else round(now - o.created),
                           "runs": o.runs, "needed": o.needed} for o in listed]))
        return
    print_table(["stage", "key", "MB", "age", "runs", "latest run needs it"],
           [[o.stage, o.key, f"{o.size / 1e6:,.1f}", _age(None if o.created is None else now - o.created),
             short(", ".join(o.runs) or "-", 40), "yes" if o.needed else "no"] for o in listed])
    print(f"\n{len(listed)} outputs, {sum(o.size for o in listed) / 1e6:,.1f} MB in {store.uri}")


@store_app.command("gc", epilog=example("labtune store gc --store ~/.labtune/store --keep-last 3 --dry-run"))
def store_gc(store_uri: str = StoreUri, keep_last: int = typer.Option(..., "--keep-last", min=0,
             help="finished runs to keep per recipe (runs in progress are always kept)"),
             dry_run: bool = typer.Option(False, "--dry-run", help="say what would be deleted; delete nothing"),
             endpoint_url: Optional[str] = Endpoint, as_json: bool = Json) -> None:
    """Delete the outputs no kept run needs (manifest first), and the checkpoints of finished
    trainings. Never what a run in progress reads or a stage is writing."""
    from labtune.store.housekeeping import collect, usage_by_stage

    store = _existing_store(store_uri, endpoint_url)
    before = sum(usage_by_stage(store).values())
    result = collect(store, keep_last, dry_run=dry_run, log=err if not as_json else (lambda line: None))
    after = before - result.freed if dry_run else sum(usage_by_stage(store).values())
    if as_json:
        print(json.dumps({"deleted": [store.uri_for(o.prefix) for o in result.deleted], "freed": result.freed,
                          "runs_dropped": result.runs_dropped, "bytes_before": before, "bytes_after": after,
                          "dry_run": dry_run}))
        return
    verb = "would free" if dry_run else "freed"
    print(f"{len(result.deleted)} outputs {'would be ' if dry_run else ''}deleted, {verb} {result.freed / 1e6:,.1f} MB: "
          f"{before / 1e6:,.1f} MB -> {after / 1e6:,.1f} MB in {store.uri}")



