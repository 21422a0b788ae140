"""A store that does not grow forever: run records, `labtune store ls` and `labtune store gc`.

Every finetune run writes `runs/<id>.json` in its store when it starts and updates it as each
stage finishes: the recipe, where the run came from (a deployment or the CLI), its state and the
stage outputs it used. Those records say which outputs are still wanted:

- `ls` lists every stage output (and each training's checkpoints) with its size, age, the runs
  that use it and whether the latest run of a deployment (or of the CLI) still needs it;
- `gc --keep-last N` keeps, per recipe, the newest N finished runs and every run still going, and
  everything their outputs were built from (the manifests' inputs); it deletes every other output
  (manifest first, so a half-deleted output is never taken for complete), the checkpoints of
  trainings that finished, and the records of runs it let go. An output whose lease is held (a
  stage being built right now) is never touched, nor are the inputs of a run in progress.

Plain Python, no Prefect: the CLI and the finetune flow call it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from labtune.store.backends import Store, StoreError
from labtune.store.lease import lease_for
from labtune.store.outputs import MANIFEST

# the stages' output folders, in run order: labtune.stages.GRAPH names the stages, but the store may not
# import it (tests/test_layout.py checks the two agree)
# (and `baseline`, the base model's answers, which the evaluate stage builds first)
STAGES = ("weights", "delta", "replay", "data", "synthesize", "tokenize", "train", "baseline", "evaluate", "export")
RUNS = "runs"
STALE_RUN_HOURS = 72.0  # a run record still "running" after this long belonged to a process that died


def record_run(store: Store, run_id: str, **fields: Any) -> dict[str, Any]:
    """Create or update `runs/<run_id>.json` (the fields given replace the record's)."""
    key = f"{RUNS}/{run_id}.json"
    try:
        record = json.loads(store.read_bytes(key))
    except (StoreError, ValueError):
        record = {"id": run_id, "started": time.time(), "stages": {}}
    stages = {**record.get("stages", {}), **fields.pop("stages", {})}
    record.update(fields, stages=stages, updated=time.time())
    store.write_bytes(key, json.dumps(record, indent=2, sort_keys=True).encode())
    return record


def read_runs(store: Store) -> list[dict[str, Any]]:
    runs = []
    for key in store.list(RUNS):
        if key.endswith(".json"):
            try:
                runs.append(json.loads(store.read_bytes(key)))
            except (StoreError, ValueError):
                continue
    return sorted(runs, key=lambda r: r.get("started", 0))


def in_progress(run: dict[str, Any], now: float | None = None) -> bool:
    now = time.time() if now is None else now
    return run.get("state") == "running" and now - float(run.get("updated", 0)) < STALE_RUN_HOURS * 3600


@dataclass
class Output:
    """One stage output (or one training's checkpoints) in the store."""

    stage: str
    key: str
    size: int = 0
    created: float | None = None  # the manifest's finish time; None: incomplete
    inputs: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    needed: bool = False

    @property
    def prefix(self) -> str:
        return f"{self.stage}/{self.key}"


def scan(store: Store) -> dict[str, Output]:
    """Every output under the stage folders and checkpoints/, by prefix, with sizes and inputs."""
    outputs: dict[str, Output] = {}
    for stage in (*STAGES, "checkpoints"):
        for key, size in store.sizes(stage).items():
            parts = key.split("/")
            if len(parts) < 3:
                continue
            prefix = "/".join(parts[:2])
            output = outputs.setdefault(prefix, Output(stage, parts[1]))
            output.size += size
            if stage != "checkpoints" and parts[2] == MANIFEST and len(parts) == 3:
                try:
                    manifest = json.loads(store.read_bytes(key))
                except (StoreError, ValueError):
                    continue
                output.created = manifest.get("timings", {}).get("finished")
                output.inputs = [v for v in manifest.get("inputs", {}).values() if isinstance(v, str)]
            elif stage == "checkpoints" and parts[-1] == MANIFEST:
                try:
                    committed = json.loads(store.read_bytes(key)).get("committed")
                except (StoreError, ValueError):
                    committed = None
                if committed and (output.created is None or committed > output.created):
                    output.created = committed
    return outputs


def _prefix_of(store: Store, uri: str) -> str | None:
    try:
        return "/".join(store.key_for(uri).split("/")[:2])
    except StoreError:
        return None  # an input outside this store (a base model folder, a data file)


def closure(store: Store, outputs: dict[str, Output], uris: list[str]) -> set[str]:
    """The prefixes of these outputs and of everything they were built from."""
    seen: set[str] = set()
    todo = [p for p in (_prefix_of(store, u) for u in uris) if p]
    while todo:
        prefix = todo.pop()
        if prefix in seen:
            continue
        seen.add(prefix)
        if prefix.startswith("train/"):
            seen.add("checkpoints/" + prefix.split("/", 1)[1])  # a training's checkpoints go with it
        output = outputs.get(prefix)
        if output is not None:
            todo += [p for p in (_prefix_of(store, u) for u in output.inputs) if p]
    return seen


def inventory(store: Store, recipe: str | None = None) -> list[Output]:
    """Every output with the runs that use it and whether a latest run still needs it (`ls`)."""
    outputs = scan(store)
    runs = read_runs(store)
    latest: dict[str, dict[str, Any]] = {}
    for run in runs:
        if run.get("state") == "completed":
            latest[str(run.get("source") or "cli")] = run  # runs are oldest first: the last one wins
    for run in runs:
        for prefix in closure(store, outputs, list(run.get("stages", {}).values())):
            if prefix in outputs:
                outputs[prefix].runs.append(str(run.get("name") or run["id"]))
    for run in list(latest.values()) + [r for r in runs if in_progress(r)]:
        for prefix in closure(store, outputs, list(run.get("stages", {}).values())):
            if prefix in outputs:
                outputs[prefix].needed = True
    listed = sorted(outputs.values(), key=lambda o: (STAGES.index(o.stage) if o.stage in STAGES else 99, -(o.created or 0)))
    if recipe:
        names = {str(r.get("name") or r["id"]) for r in runs if r.get("recipe") == recipe}
        listed = [o for o in listed if names & set(o.runs)]
    return listed


@dataclass
class Collection:
    deleted: list[Output]
    kept: list[Output]
    runs_dropped: list[str]

    @property
    def freed(self) -> int:
        return sum(o.size for o in self.deleted)


def collect(store: Store, keep_last: int, dry_run: bool = False, log: Any = print) -> Collection:
    """Delete what no kept run needs (see the module's docstring). `dry_run`: say, delete nothing."""
    outputs = scan(store)
    runs = read_runs(store)
    kept_runs: list[dict[str, Any]] = [r for r in runs if in_progress(r)]
    by_recipe: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if not in_progress(run):
            by_recipe.setdefault(str(run.get("recipe")), []).append(run)
    for finished in by_recipe.values():
        kept_runs += finished[-keep_last:] if keep_last > 0 else []
    keep = set()
    for run in kept_runs:
        keep |= closure(store, outputs, list(run.get("stages", {}).values()))
    deleted, kept = [], []
    for prefix, output in sorted(outputs.items()):
        finished_training = output.stage == "checkpoints" and f"train/{output.key}" in outputs \
            and outputs[f"train/{output.key}"].created is not None
        wanted = prefix in keep and not finished_training
        if output.stage == "checkpoints" and not finished_training and prefix not in keep:
            # an unfinished training's checkpoints: kept while anything may still resume it
            wanted = f"train/{output.key}" in keep or any(in_progress(r) for r in runs)
        if wanted or _being_built(store, output):
            kept.append(output)
            continue
        deleted.append(output)
        log(f"{'would delete' if dry_run else 'deleting'} {store.uri_for(prefix)} ({output.size:,} bytes)")
        if not dry_run:
            _delete(store, output)
    kept_ids = {r["id"] for r in kept_runs}
    dropped = [r["id"] for r in runs if r["id"] not in kept_ids]
    if not dry_run:
        for run_id in dropped:
            store.delete(f"{RUNS}/{run_id}.json")
    return Collection(deleted, kept, dropped)


def _being_built(store: Store, output: Output) -> bool:
    """A stage output whose lease another process holds right now: never deleted under it."""
    if output.stage == "checkpoints":
        return False
    return lease_for(store, output.stage, output.key).busy()


def _delete(store: Store, output: Output) -> None:
    if output.stage == "checkpoints":
        for key in store.list(output.prefix):
            if key.endswith("/" + MANIFEST):
                store.delete(key)  # every step's manifest first: no step is resumable half-deleted
    else:
        store.delete(f"{output.prefix}/{MANIFEST}")
    store.delete_prefix(output.prefix)


def usage_by_stage(store: Store) -> dict[str, int]:
    """Bytes under each top-level folder of the store (the stages, checkpoints, runs)."""
    sizes: dict[str, int] = {}
    for key, size in store.sizes("").items():
        top = key.split("/", 1)[0]
        sizes[top] = sizes.get(top, 0) + size
    return dict(sorted(sizes.items(), key=lambda item: -item[1]))


def usage_markdown(store: Store) -> str:
    """The store's size by stage as a bar chart (a PNG the Prefect UI shows inline) and a table."""
    import matplotlib

    from labtune.plots import figure_png, png_markdown

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = usage_by_stage(store)
    total = sum(sizes.values())
    lines = [f"# Store usage: {total / 1e6:,.1f} MB", "", f"Store: `{store.uri}`. `labtune store ls` lists every output; "
             "`labtune store gc --keep-last N` deletes what the last N runs of each recipe do not need.", ""]
    if sizes:
        figure, axis = plt.subplots(figsize=(6, 0.4 * len(sizes) + 0.8))
        names = list(sizes)[::-1]
        axis.barh(names, [sizes[n] / 1e6 for n in names], color="#3b82f6")
        axis.set_xlabel("MB")
        figure.tight_layout()
        lines += [png_markdown("store usage by stage", figure_png(figure)), ""]
    lines += ["| folder | MB |", "|---|---|"] + [f"| {name} | {size / 1e6:,.1f} |" for name, size in sizes.items()]
    return "\n".join(lines)
