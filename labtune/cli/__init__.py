"""labtune's command line (Typer, the library Prefect's own CLI is built on).

Overrides (`key=value`) and options may come in any order after the recipe. Exit codes: 0 done,
1 a failure while running (a crashed worker, an unreachable store or server), 2 bad input (usage,
a recipe, a file, a flag). Every error is one line on stderr; LABTUNE_DEBUG=1 adds the traceback
of an unexpected one. The one-stage commands and the tools never import Prefect.
"""

from __future__ import annotations

import os
import sys

import typer

from labtune.cli.common import app, err
from labtune.errors import LabtuneError, check_environment, one_line

# each module registers its commands on the app, in the order `labtune --help` lists them
# isort: off
from labtune.cli import pipeline  # noqa: F401, E402
from labtune.cli import models  # noqa: F401, E402
from labtune.cli import ops  # noqa: F401, E402
# isort: on

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Run the command; every error ends as one line on stderr with the documented exit code."""
    try:
        check_environment()
        code = typer.main.get_command(app).main(args=argv, prog_name="labtune", standalone_mode=False)
        if code == 130:  # Typer turns Ctrl-C into a silent exit code
            err("labtune: interrupted")
    except (LabtuneError, OSError) as exc:
        line, code = one_line(exc) or (f"{exc.strerror or exc}", 1)
        err(f"labtune: error: {line}")
    except KeyboardInterrupt:
        err("labtune: interrupted")
        code = 130
    except Exception as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `labtune`, `labtune stack`: the help, as asked
            print(exc.format_message())
            code = 0
        elif hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # a usage error, from Typer's click
            context = getattr(exc, "ctx", None)
            where = context.command_path if context is not None else "labtune"
            err(f"{where}: error: {exc.format_message()} (see {where} --help)")
            code = exc.exit_code
        elif type(exc).__name__ == "Abort":  # Ctrl-C at a prompt
            err("labtune: interrupted")
            code = 130
        elif os.environ.get("LABTUNE_DEBUG"):
            raise
        else:  # a bug or an unforeseen failure: still one line, the traceback on request
            first = (str(exc).splitlines() or [""])[0]
            err(f"labtune: error: {type(exc).__name__}: {first} (LABTUNE_DEBUG=1 shows the traceback)")
            code = 1
    sys.exit(code if isinstance(code, int) else 0)

