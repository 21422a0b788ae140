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
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

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
