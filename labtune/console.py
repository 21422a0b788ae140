"""What `labtune run` and `labtune sweep` print while a flow runs in this process.

Prefect's console handler prints every record, each failure with its traceback, and a JSON line
per training step. At a terminal a person wants the run's lines, a progress bar, and, when
something goes wrong, the one line the command ends with. So for the run: the whole log,
tracebacks and progress lines included, goes to a file under ~/.labtune/logs (and to the UI, as
before); the terminal gets the lines without tracebacks, and no progress lines where a bar shows
them. LABTUNE_DEBUG=1 puts everything on the terminal again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from labtune.errors import one_line
from labtune.store.backends import labtune_home


class TerminalHandler(logging.Handler):
    """Prefect's records for a person at a terminal, written around any tqdm bar."""

    def __init__(self, formatter: logging.Formatter | None, level: int, tty: bool, debug: bool):
        super().__init__(level)
        self.setFormatter(formatter or logging.Formatter("%(asctime)s | %(levelname)-7s | %(message)s"))
        self.tty, self.debug = tty, debug

    def shown(self, record: logging.LogRecord) -> bool:
        if self.debug:
            return True
        message = record.getMessage()
        if self.tty and message.startswith("progress {"):
            return False  # the stage's progress bar shows it
        if record.exc_info and record.exc_info[1] is not None and one_line(record.exc_info[1]):
            return False  # the command ends with this error's one line
        if message.startswith("Crash detected! Execution was aborted by an interrupt signal"):
            return False  # Ctrl-C: the command ends with "labtune: interrupted" and the runs are Cancelled
        if message.startswith("Finished in state ") and not message.startswith(("Finished in state Completed",
                                                                                 "Finished in state Cached")):
            return False  # the same failure again, as a state
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if not self.shown(record):
            return
        saved = record.exc_info, record.exc_text, record.stack_info
        if not self.debug:
            record.exc_info = record.exc_text = record.stack_info = None
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)


def log_folder() -> Path:
    return labtune_home() / "logs"


@contextlib.contextmanager
def run_console(name: str) -> Iterator[Path]:
    """For the block: Prefect's console handler swapped for a TerminalHandler, and the whole log
    written to a file; yields the file's path."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    root = logging.getLogger()
    consoles = [h for h in root.handlers if isinstance(h, PrefectConsoleHandler)]
    folder = log_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    formatter = consoles[0].formatter if consoles else None
    whole = logging.FileHandler(path, encoding="utf-8")
    whole.setLevel(logging.DEBUG)
    whole.setFormatter(formatter or logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    terminal = TerminalHandler(formatter, consoles[0].level if consoles else logging.INFO, sys.stderr.isatty(),
                               bool(os.environ.get("LABTUNE_DEBUG")))
    for handler in consoles:
        root.removeHandler(handler)
    root.addHandler(terminal)
    root.addHandler(whole)
    try:
        yield path
    finally:
        root.removeHandler(terminal)
        root.removeHandler(whole)
        whole.close()
        for handler in consoles:
            root.addHandler(handler)


# --- a stage's progress at a terminal (the one-stage commands, the Prefect tasks) ------------------

ESTIMATE_AFTER_STEPS = 5  # the first step also builds the graph and warms caches: it is not counted


def with_estimate(on_progress: Callable[[dict], None] | None, log: Callable[[str], None]) -> Callable[[dict], None]:
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
