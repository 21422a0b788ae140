"""The Prefect edge of the six stages: each module is a `@task` around a Prefect-free stage in
`labtune/stages/`, with its retry policy and the artifacts it shows in the UI."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from prefect import get_run_logger

from labtune.errors import LabtuneError


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry crashes and network faults, never bad input (each labtune
    error says whether a retry can help; StoreUnavailable already waited out store.retry_seconds)."""
    try:
        state.result()
    except LabtuneError as exc:
        return exc.transient
    except Exception:
        return True
    return False


class _ToRunLog(logging.Handler):
    def __init__(self, logger: logging.LoggerAdapter):
        super().__init__(logging.INFO)
        self.run_logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.log(record.levelno, record.getMessage())


@contextlib.contextmanager
def run_log() -> Iterator[logging.LoggerAdapter]:
    """The task run's logger, with the library's own `labtune` log records (store retries, say)
    forwarded to it for the block's duration: the library never imports Prefect."""
    logger = get_run_logger()
    handler = _ToRunLog(logger)
    library = logging.getLogger("labtune")
    library.addHandler(handler)
    try:
        yield logger
    finally:
        library.removeHandler(handler)


class ServerTolerant:
    """Calls to the Prefect API made while a stage runs (progress and checkpoint artifacts), made
    from a thread of their own: the stage never waits for the server. If the server is away
    (restarting, upgraded, a network blip), the Prefect client's own retries run in that thread;
    a call that still fails is skipped with one warning, and the next one after the server is back
    updates the UI again. At most one call is in flight and one waits (the newest)."""

    def __init__(self, logger: logging.LoggerAdapter):
        import queue
        import threading

        self.logger = logger
        self.away_since: float | None = None
        self.skipped = 0
        self.calls: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="labtune-ui-updates")
        self.thread.start()

    def __call__(self, update, *args, **kwargs) -> None:
        import contextvars

        # the caller's Prefect run context travels with the call: artifacts stay attached to this task run
        self.calls.put((contextvars.copy_context(), update, args, kwargs))

    def _run(self) -> None:
        import time

        while True:
            call = self.calls.get()
            if call is None:
                return
            context, update, args, kwargs = call
            try:
                context.run(update, *args, **kwargs)
            except Exception as exc:  # httpx connection errors, 5xx answers while the server restarts
                self.skipped += 1
                if self.away_since is None:
                    self.away_since = time.time()
                    self.logger.warning(f"Prefect server unreachable ({type(exc).__name__}): UI updates paused, "
                                        "the stage goes on")
                continue
            if self.away_since is not None:
                self.logger.info(f"Prefect server back after {time.time() - self.away_since:.0f} s; "
                                 f"{self.skipped} UI update(s) were skipped meanwhile")
                self.away_since, self.skipped = None, 0

    def close(self, timeout: float = 60.0) -> None:
        """Let the waiting updates through (the server may be slow to answer), then stop."""
        self.calls.put(None)
        self.thread.join(timeout)
