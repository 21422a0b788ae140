"""Launching the training worker under torchrun, and reading its failures (Prefect-free).

`run_torchrun` streams every output line to the stage's log (and all of them to a log file), feeds
progress and checkpoint records to their callbacks, and on a failure raises one error: TrainError
with the worker's own error line (retrying will not help), or TrainCrashed when a rank died without
one (a retry resumes from the last checkpoint). The banners and tracebacks stay in the log file.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import labtune
from labtune.errors import LabtuneError, RunFailure
from labtune.recipe import ParallelConfig
from labtune.store.backends import labtune_home
from labtune.training.worker_config import MALLOC_SETTINGS, WORKER_ERROR

Log = Callable[[str], None]


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
