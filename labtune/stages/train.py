"""Stage 5, train: torchrun + FSDP2 fine-tuning, every rank's output streamed line by line.

The stage writes the worker's config, launches `torchrun --nproc_per_node=N -m
labtune.training.worker`, passes each output line to the log (the Prefect task log when run as a
task), and fails with the worker's last lines if torchrun fails. The trained model (safetensors,
config, tokenizer, train_metrics.json) is then committed to the store.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import labtune
from labtune.errors import LabtuneError, RunFailure
from labtune.models.card import base_license, model_card
from labtune.recipe import ParallelConfig, Recipe, TrainConfig
from labtune.store.backends import Store, StoreError, labtune_home
from labtune.store.outputs import (
    CommittedElsewhere,
    Log,
    StageResult,
    checkpoint_prefix,
    code_version,
    default_log,
    fetch,
    read_manifest,
    run_stage,
    stage_key,
)
from labtune.training.worker_config import MALLOC_SETTINGS, WORKER_ERROR, WorkerConfig

# what the worker runs, for the train stage's code hash: a change to any of them is a new model
WORKER_MODULES = ("labtune.training.worker", "labtune.training.worker_config", "labtune.training.loss",
                  "labtune.training.packing", "labtune.training.frozen_prefix", "labtune.training.early_stopping",
                  "labtune.training.distill")


class TrainError(LabtuneError):
    """The worker stopped with an error (bad setting, data, model); retrying will not help."""


class TrainCrashed(RunFailure):
    """A worker or torchrun died without an error of its own (killed, out of memory, a lost node):
    a retry resumes from the last checkpoint, so the Prefect task retries it."""

    transient = True


def torchrun_command(parallel: ParallelConfig, config_path: Path, run_id: str) -> list[str]:
    """torchrun's command line. One node: a private c10d rendezvous on a port torchrun binds itself. Several: the
    recipe's rendezvous; with c10d, torchrun hands out ranks in order of arrival, so any node may
    hold rank 0 (the stage copes, see build_train); `static` makes node_rank 0 hold it."""
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={parallel.processes}"]
    if parallel.nnodes == 1:
        # torchrun binds its own store on a free port (c10d on 127.0.0.1:0) and the workers share it:
        # a port chosen here and bound later could be taken in between (a flaky "address in use")
        launch += ["--nnodes=1", "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", f"--rdzv_id=labtune-{run_id}"]
    elif parallel.rdzv_backend == "static":
        host, _, port = str(parallel.rdzv_endpoint).rpartition(":")
        launch += [f"--nnodes={parallel.nnodes}", f"--node_rank={parallel.node_rank}", f"--master_addr={host}",
                   f"--master_port={port}"]
    else:
        launch += [f"--nnodes={parallel.nnodes}", f"--node_rank={parallel.node_rank}", "--rdzv_backend=c10d",
                   f"--rdzv_endpoint={parallel.rdzv_endpoint}", f"--rdzv_id=labtune-{run_id}",
                   f"--rdzv_conf=join_timeout={parallel.rdzv_timeout}"]
    return launch + ["-m", "labtune.training.worker", "--config", str(config_path)]


# where a failure's tracebacks and torchrun's banners begin: from there on, lines go to the log file
# only, and the person reads one line (the worker's own error) that names that file
_FAILURE_START = re.compile(r"^(Traceback \(most recent call last\)|=+$|\[rank\d+\]:|E\d{4} \d\d:|"
                            + re.escape(WORKER_ERROR) + r")|ChildFailedError")


def torchrun_log_path(command: list[str]) -> Path:
    """The file that keeps a torchrun launch's whole output (named in a failure's one line)."""
    run_id = next((part.split("=", 1)[1] for part in command if part.startswith("--rdzv_id=")), "train")
    return labtune_home() / "logs" / f"torchrun-{run_id}-{os.getpid()}.log"


def run_torchrun(command: list[str], env: dict[str, str], log: Log, on_progress: Callable[[dict], None] | None = None,
                 on_checkpoint: Callable[[dict], None] | None = None) -> None:
    """Run torchrun, one log record per output line, live, and every line in a log file. Raise
    TrainError with the worker's error line when it reported one, TrainCrashed with the tail when it
    died without one; the tracebacks and banners after a failure stay in the file the error names."""
    tail: collections.deque[str] = collections.deque(maxlen=200)  # torchrun's root-cause record and a rank's traceback
    worker_errors: list[str] = []
    log_path = torchrun_log_path(command)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    failing = False
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
    assert proc.stdout is not None
    try:
        with open(log_path, "w", encoding="utf-8") as whole:
            for line in proc.stdout:
                whole.write(line)
                line = line.rstrip()
                if not line:
                    continue
                tail.append(line)
                if line.startswith(WORKER_ERROR):
                    worker_errors.append(line)
                failing = failing or bool(_FAILURE_START.search(line))
                # a progress line is its callback's to show; a checkpoint record follows its human-readable line
                if not failing and not (on_progress and line.startswith("progress ")) and not line.startswith("checkpoint {"):
                    log(line)
                for prefix, callback in (("progress ", on_progress), ("checkpoint {", on_checkpoint)):
                    if callback and line.startswith(prefix):
                        try:
                            record = json.loads(line[len(prefix) - (prefix.endswith("{")):])
                        except ValueError:
                            continue  # a malformed line is still in the log; only the callback skips it
                        callback(record)
        code = proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait(timeout=30)
        raise
    if code != 0:
        failure = train_failure(code, list(tail), worker_errors)
        raise type(failure)(f"{failure} (torchrun's whole output: {log_path})")
    log_path.unlink(missing_ok=True)  # a run that succeeded keeps its lines in the stage's log


def train_failure(code: int, lines: list[str], worker_errors: list[str]) -> TrainError | TrainCrashed:
    """Why torchrun failed, from the failing rank's point of view. A rank killed by a signal it did
    not explain (out of memory, preemption, SIGKILL) makes a crash, retried from the last
    checkpoint; the other ranks' errors are then only the broken connections it left behind.
    Otherwise the failing rank's own error line, which a retry would not change."""
    records = failure_records(lines)
    said = {}
    for line in worker_errors:
        match = re.search(r"\(rank (\d+)\)", line)
        if match:
            said.setdefault(int(match.group(1)), line.strip())
    # torchrun sends SIGTERM to the other ranks once one fails: those are not causes
    signalled = [r for r in records if r["exitcode"] < 0 and r["exitcode"] != -15]
    if not signalled and records and all(r["exitcode"] == -15 for r in records):
        signalled = records  # SIGTERM from outside: every rank got it
    for record in signalled:
        if record["rank"] not in said:
            return TrainCrashed(f"torchrun exited with code {code} (a worker died; a re-run resumes from the last "
                                f"checkpoint): {describe_failure(record, lines)}")
    root = records[0]["rank"] if records else None
    if said:
        return TrainError(f"torchrun exited with code {code}: {said.get(root) or worker_errors[0].strip()}")
    cause = describe_failure(records[0], lines) if records else last_words(lines)
    return TrainCrashed(f"torchrun exited with code {code} (a worker died; a re-run resumes from the last checkpoint): {cause}")


_EXCEPTION_LINE = re.compile(r"^(?:\[[^\]]*\]:?\s*)?((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt)): \S")
_ABORT_LINE = re.compile(r"terminate called|what\(\):|free\(\)|malloc\(\)|corrupted|double free|Fatal Python error|"
                         r"Assertion .* failed|Segmentation fault|Aborted")


def failure_records(lines: list[str]) -> list[dict]:
    """torchrun's failure records ({rank, exitcode, traceback}), the root cause ("first observed
    failure") first, then the others it lists."""
    records: list[dict] = []
    section, current = None, None
    for line in lines:
        text = line.strip()
        if text.startswith(("Failures:", "Root Cause")):
            section = "root" if text.startswith("Root Cause") else "other"
            continue
        if section and re.fullmatch(r"\[\d+\]:", text):
            current = {"section": section, "rank": None, "exitcode": 0, "traceback": ""}
            records.append(current)
            continue
        if current is not None and ":" in text and not text.startswith(("=", "-")):
            name, _, value = text.partition(":")
            name, value = name.strip(), value.strip()
            if name == "rank" and value.split()[0].isdigit():
                current["rank"] = int(value.split()[0])
            elif name == "exitcode" and value.split()[0].lstrip("-").isdigit():
                current["exitcode"] = int(value.split()[0])
            elif name == "traceback":
                current["traceback"] = value
    records = [r for r in records if r["rank"] is not None]
    return sorted(records, key=lambda r: r["section"] != "root")


def exception_lines(lines: list[str]) -> list[str]:
    """The exception lines ranks printed, without torchrun's own ChildFailedError."""
    return [line.strip() for line in lines if _EXCEPTION_LINE.match(line.strip()) and "ChildFailedError" not in line]


def describe_failure(record: dict, lines: list[str]) -> str:
    """A rank, its exit code, and what it or the runtime said: the signal, its last exception, the
    C++ runtime's or libc's message before an abort."""
    exceptions = exception_lines(lines)
    detail = record["traceback"]
    if not detail or detail.startswith("To enable traceback"):
        detail = exceptions[-1] if exceptions else "no traceback"
    aborts = [line.strip() for line in lines if _ABORT_LINE.search(line)]
    if aborts:
        detail += f" after: {aborts[-1]}"
    return f"rank {record['rank']} (exit code {record['exitcode']}): {detail}"


def last_words(lines: list[str]) -> str:
    """Without a failure record: the last exception line, else the last line that is not a banner."""
    exceptions = exception_lines(lines)
    if exceptions:
        return exceptions[-1]
    plain = [line.strip() for line in lines if line.strip() and not set(line.strip()) <= set("=-*")]
    return plain[-1] if plain else "no output"


def train_env(nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name, value in MALLOC_SETTINGS.items():
        env.setdefault(name, value)
    # the folder that holds the labtune package, so the worker imports this labtune even where it is not installed
    package_root = Path(labtune.__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root), env.get("PYTHONPATH")]))
    return env


def fitting_accumulation(recipe: Recipe, examples: int, log: Log) -> int:
    """gradient_accumulation_steps for this data: the recipe's, when one optimizer step's worth of
    examples exists (the seed's "size of tensor a must match" failure came from an epoch shorter
    than one accumulation window), else lowered when the recipe allows it, else an error."""
    world, batch = recipe.parallel.world_size, recipe.train.per_device_train_batch_size
    steps = recipe.train.gradient_accumulation_steps
    need = world * batch * steps
    if examples >= need:
        return steps
    ranks = f"parallel.nproc_per_node {world}" if recipe.parallel.nnodes == 1 else \
        f"parallel.nnodes {recipe.parallel.nnodes} x parallel.nproc_per_node {recipe.parallel.processes}"
    numbers = (f"{examples} training examples are fewer than one optimizer step takes: {ranks} "
               f"x train.per_device_train_batch_size {batch} x train.gradient_accumulation_steps {steps} = {need}")
    fitting = examples // (world * batch)
    if not recipe.train.allow_lower_accumulation or fitting < 1:
        hint = "lower per_device_train_batch_size or nproc_per_node" if fitting < 1 else \
            "set train.allow_lower_accumulation: true, or lower those numbers"
        raise TrainError(f"{numbers}; add data or {hint}")
    log(f"train: {numbers}; gradient_accumulation_steps lowered to {fitting} (train.allow_lower_accumulation)")
    return fitting


def fit_memory(recipe: Recipe, train: TrainConfig, model_dir: Path, tokens_dir: Path, log: Log) -> tuple[TrainConfig, dict]:
    """The pre-flight memory check (labtune/training/memory.py): `train` with gradient_checkpointing
    resolved, and the estimate; TrainError with the numbers and what would fit when nothing does."""
    import torch

    from labtune.training import memory

    use_cuda = recipe.parallel.backend != "gloo" and torch.cuda.is_available()
    parallel = recipe.parallel
    dev = memory.devices(use_cuda, parallel.processes, parallel.memory_per_rank_gib)
    shape = memory.Shape.of_model_dir(model_dir, train)
    length, labels = memory.data_limits(tokens_dir)
    if train.packing:  # a packed row is as long as packing_length and may be all answers
        length = labels = max(length, int(train.packing_length or length))
    try:
        resolved, est = memory.plan(train, parallel.world_size, parallel.processes, shape,
                                    lambda rows: memory.Batch(rows, length, rows * labels), dev)
    except memory.DoesNotFit as exc:
        raise TrainError(str(exc)) from None
    available = f"{dev.per_rank / memory.GIB:.1f} GiB per rank ({dev.name.rstrip(',')})"
    chosen = f"; gradient_checkpointing auto -> {resolved.gradient_checkpointing!r}" \
        if train.gradient_checkpointing == "auto" else ""
    peak = memory.peak_cpu_rank(est) if dev.kind == "cpu" else est.device
    log(f"memory: ~{peak / memory.GIB:.1f} GiB per rank estimated, training {est.describe()}, of {available}{chosen}")
    return resolved, {"estimate_gib": round(peak / memory.GIB, 2), "parts_gib": est.gib(),
                      "available_gib": round(dev.per_rank / memory.GIB, 2), "device": dev.name,
                      "gradient_checkpointing": resolved.gradient_checkpointing}


def train_key(recipe: Recipe, model_uri: str, tokens_uri: str) -> tuple[str, dict[str, Any]]:
    """The train stage's key (its output is `train/<key>`, its checkpoints `checkpoints/<key>`)
    and the parameters it hashes."""
    # Where this node sits and how it finds the others is not part of the run's identity: every
    # node must compute the same key (its rendezvous id, its checkpoints) and a re-run with another
    # endpoint still resumes.
    placement = {"node_rank", "rdzv_endpoint", "rdzv_timeout", "memory_per_rank_gib"}
    parameters = {"train": recipe.train.model_dump(mode="json", exclude={"report_to", "logging_dir"}),
                  "parallel": recipe.parallel.model_dump(mode="json", exclude=placement)}
    code = code_version(__name__, "labtune.models.card", *WORKER_MODULES)
    return stage_key("train", code, {"model": model_uri, "tokens": tokens_uri}, parameters), parameters


def build_train(recipe: Recipe, store: Store, model_uri: str, tokens_uri: str, log: Log = default_log,
                on_progress: Callable[[dict], None] | None = None,
                on_checkpoint: Callable[[dict], None] | None = None, run_tags: dict[str, str] | None = None) -> StageResult:
    """Fine-tune the model at model_uri on the tokenize stage's output at tokens_uri; run_tags go to
    the experiment trackers (the Prefect flow-run id, when Prefect runs it)."""
    key, parameters = train_key(recipe, model_uri, tokens_uri)

    def build(out: Path) -> dict[str, Any]:
        tokens_dir = fetch(store, tokens_uri, log)
        examples = json.loads((tokens_dir / "report.json").read_text())["train"]["examples"]
        accumulation = fitting_accumulation(recipe, examples, log)
        model_dir = fetch(store, model_uri, log)
        resolved = {"gradient_accumulation_steps": accumulation,
                    "packing_length": recipe.train.packing_length or recipe.data.model_max_length}
        train, memory_plan = fit_memory(recipe, recipe.train.model_copy(update=resolved), model_dir, tokens_dir, log)
        config_path = out.parent / "train_config.json"
        dev_dir = tokens_dir / "dev"
        WorkerConfig(model_dir=str(model_dir), train_dir=str(tokens_dir / "train"), output_dir=str(out),
                     dev_dir=str(dev_dir) if dev_dir.is_dir() else None,
                     checkpoint_dir=str(out.parent / "checkpoints"), checkpoint_prefix=checkpoint_prefix(key),
                     # the store this stage writes to (a test may pass its own), reached as the recipe says
                     store=recipe.store.settings().at(store.uri), backend=recipe.parallel.backend,
                     train=train, logging_dir=recipe.train.logging_dir or str(labtune_home() / "tensorboard" / recipe.name / key),
                     run_name=f"{recipe.name}-{key[:8]}",
                     run_tags={"recipe": recipe.name, "train_key": key, **(run_tags or {})}).write(config_path)
        nproc = recipe.parallel.processes
        command = torchrun_command(recipe.parallel, config_path, key)
        log("launching: " + " ".join(command[1:]))
        run_torchrun(command, train_env(nproc), log, with_estimate(on_progress, log), on_checkpoint)
        if not (out / "train_metrics.json").is_file() and recipe.parallel.nnodes > 1:
            raise CommittedElsewhere("rank 0 ran on another node; that node's stage commits the model")
        metrics = json.loads((out / "train_metrics.json").read_text())
        plot_loss(metrics["history"], out / "loss.png", title=f"{recipe.name}: training loss",
                  dev=(metrics.get("early_stopping") or {}).get("evaluations"))
        write_model_card(out, recipe, store, model_dir, tokens_uri, parameters, metrics)
        return {"metrics": {k: metrics.get(k) for k in ("optimizer_steps", "examples", "train_seconds", "world_size",
                                                        "resumed_from_step", "checkpoints", "train_flops",
                                                        "train_label_tokens", "dev_flops")},
                "early_stopping": metrics.get("early_stopping"),
                "memory": {**memory_plan, "measured_peak_gib": metrics.get("peak_memory_gib")},
                "final_loss": metrics["history"][-1]["loss"] if metrics["history"] else None}

    nodes = recipe.parallel.nnodes
    return run_stage(store, "train", key, build, inputs={"model": model_uri, "tokens": tokens_uri},
                     parameters=parameters, log=log,
                     work_name=f"train-{key}-node{recipe.parallel.node_rank}" if nodes > 1 else None)


def write_model_card(out: Path, recipe: Recipe, store: Store, base_dir: Path, tokens_uri: str,
                     parameters: dict[str, Any], metrics: dict[str, Any]) -> None:
    """README.md in the model folder: base, data (the tokenize and data stages' reports), training.
    The evaluation comes later: the evaluate stage's table goes into an export's card."""
    tokens = read_manifest(store, store.key_for(tokens_uri)) or {}
    data_uri = (tokens.get("inputs") or {}).get("data")
    try:  # the data stage's report, where its output is in this store (a copied or moved store may lack it)
        data = (read_manifest(store, store.key_for(data_uri)) or {}) if data_uri else {}
    except StoreError:
        data = {}
    (out / "README.md").write_text(model_card(recipe.name, recipe.base_model.source, base_license(base_dir),
                                              recipe.model_dump(mode="json"), parameters, metrics,
                                              data.get("report"), tokens.get("report")))


ESTIMATE_AFTER_STEPS = 5  # the first step also builds the graph and warms caches: it is not counted


def with_estimate(on_progress: Callable[[dict], None] | None, log: Log) -> Callable[[dict], None]:
    """on_progress (or, without one, the step's progress line in the log), and once, after the
    first few measured steps, a line saying how long training will take ("train: 1,488 optimizer
    steps, about 33 min at 1.3 s a step (steps 2-5)")."""
    times: list[float] = []

    def update(record: dict) -> None:
        if on_progress:
            on_progress(record)
        else:
            log("progress " + json.dumps(record))
        if record.get("step_time_s") is None or len(times) > ESTIMATE_AFTER_STEPS:
            return
        times.append(float(record["step_time_s"]))
        if len(times) == ESTIMATE_AFTER_STEPS or record["step"] == record["total_steps"]:
            log(estimate_line(record["step"], record["total_steps"], times[1:] or times))
            times.append(0.0)  # said once

    return update


def estimate_line(step: int, total: int, step_times: list[float]) -> str:
    per_step = sum(step_times) / len(step_times)
    left = per_step * (total - step)
    eta = f"{left / 3600:.1f} h" if left >= 5400 else f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
    first = step - len(step_times) + 1
    return (f"train: {total:,} optimizer steps, about {eta} to go at {per_step:.2f} s a step "
            f"(measured on steps {first}-{step})")


def plot_loss(history: list[dict[str, Any]], path: Path, title: str, dev: list[dict[str, Any]] | None = None) -> None:
    """The loss curve as a PNG beside the model (and the learning rate on a second axis); with
    early stopping, a second panel: the dev questions answered against the training FLOPs spent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 2 if dev else 1, figsize=(11 if dev else 7, 3.5), dpi=100, squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in history], color="tab:blue", marker="." if len(steps) < 60 else None, label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss", color="tab:blue")
    lr_axis = ax.twinx()
    lr_axis.plot(steps, [r["learning_rate"] for r in history], color="tab:gray", linewidth=1, linestyle="--")
    lr_axis.set_ylabel("learning rate", color="tab:gray")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if dev:
        flops = {r["step"]: r.get("flops") for r in history}
        points = [(flops.get(e["step"]), e["dev_accuracy"]) for e in dev if flops.get(e["step"]) is not None]
        panel = axes[0][1]
        panel.plot([x for x, _ in points], [100 * y for _, y in points], color="tab:green", marker="o")
        panel.set_xlabel("training FLOPs")
        panel.set_ylabel("dev questions answered (%)")
        panel.set_ylim(0, 100)
        panel.set_title("held-out wordings (early stopping)")
        panel.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def artifact_link(uri: str) -> str:
    """A link a browser can follow for local stores (file://); s3:// URIs stay as they are."""
    return uri if "://" in uri else Path(uri).as_uri()


@contextlib.contextmanager
def progress_bar() -> Iterator[Callable[[dict], None]]:
    """A tqdm bar per stage on stderr (shown only on a terminal), fed by progress records
    ({"step", "total_steps"}, and "stage", "loss", "tokens_per_s" where known)."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(record: dict) -> None:
        stage = record.get("stage", "train")
        bar = bars.get(stage)
        if bar is None:
            for earlier in bars.values():
                earlier.close()
            bar = bars[stage] = tqdm(total=record["total_steps"], desc=stage, unit="step" if stage == "train" else "answer",
                                     disable=not sys.stderr.isatty(), dynamic_ncols=True)
        bar.n = record["step"]
        shown = {"loss": record.get("loss"), "tok/s": record.get("tokens_per_s")}
        bar.set_postfix({k: v for k, v in shown.items() if v is not None}, refresh=True)

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()
