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
