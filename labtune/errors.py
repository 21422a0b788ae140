"""Errors a person can act on: each message is one line naming the file, record, key or URI.

The command line prints them as one line and exits with `exit_code`: 2 for bad input (a recipe,
a file, a flag), 1 for a failure while running. `transient` tells the Prefect layer whether a
retry can help.
"""


class LabtuneError(RuntimeError):
    """Bad input or a missing thing. Retrying will not help, so Prefect tasks do not retry it."""

    exit_code = 2
    transient = False


class RunFailure(LabtuneError):
    """Something failed while running (a crashed worker, an unreachable service, a failed flow run)."""

    exit_code = 1


def yaml_error(path: object, exc: Exception) -> str:
    """A PyYAML error as one line: the file, line and column PyYAML reports, and its reason."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    reason = getattr(exc, "problem", None) or (str(exc).splitlines() or ["?"])[0]
    context = getattr(exc, "context", None)
    return f"{where}: not valid YAML: {reason}" + (f" ({context})" if context else "")



class RecipeError(LabtuneError, ValueError):
    """A recipe that cannot be used; the message is one line naming the file and key."""


def one_line(exc: BaseException) -> tuple[str, int] | None:
    """The one line and exit code a person gets for an error they can act on: a labtune error, or
    an OS error on a path they gave (not a directory, read-only, exists, permission). None for
    anything else (a bug: its traceback is wanted)."""
    if isinstance(exc, LabtuneError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError) and exc.filename:
        reason = exc.strerror or type(exc).__name__
        where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else str(exc.filename)
        return f"{where}: {reason}", 2
    return None


def env_seconds(name: str, default: float) -> float:
    """A number of seconds from the environment variable `name`, checked: a bad value is one line
    naming the variable (exit 2), not a traceback from float()."""
    import math
    import os

    text = os.environ.get(name) or ""
    try:
        value = float(text) if text else default
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise LabtuneError(f"{name}={text!r}: must be a number of seconds above 0")
    return value


def check_environment() -> None:
    """The environment variables labtune reads as numbers, checked before any command runs."""
    import os

    port = os.environ.get("LABTUNE_PREFECT_PORT")
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise LabtuneError(f"LABTUNE_PREFECT_PORT={port!r}: must be a port number from 1 to 65535")
    env_seconds("LABTUNE_UNRESPONSIVE_SECONDS", 1.0)
