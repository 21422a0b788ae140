"""The command line's shared parts: the Typer apps, the options several commands take, and how
the commands print (one line on stderr, rich tables on stdout)."""


from __future__ import annotations

import json
import sys
import time
from enum import Enum
from typing import Any

import typer

from labtune import __version__

app = typer.Typer(name="labtune", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Fine-tune LLaMA-family chat models on a lab's own notes, tracked by Prefect.")
stack_app = typer.Typer(no_args_is_help=True, help="The local stack: Prefect server, S3 endpoint, pools, workers, deployments.")
server_app = typer.Typer(no_args_is_help=True, help="The local Prefect server.")
app.add_typer(stack_app, name="stack")
store_app = typer.Typer(no_args_is_help=True, help="The store: what it holds, and deleting what no recent run needs.")
app.add_typer(server_app, name="server")
app.add_typer(store_app, name="store")


Recipe = typer.Argument(..., metavar="RECIPE", help="the recipe YAML", show_default=False)
Overrides = typer.Argument(None, metavar="KEY=VALUE", help="dotted overrides, e.g. train.num_train_epochs=5",
                           show_default=False)
Json = typer.Option(False, "--json", help="print one JSON object instead of text")
# click reads and checks the environment variables: a bad one is one line naming it, exit 2
Port = typer.Option(4200, "--port", envvar="LABTUNE_PREFECT_PORT", min=1, max=65535, help="the Prefect server's port on 127.0.0.1 (env LABTUNE_PREFECT_PORT)")
Endpoint = typer.Option(None, "--endpoint-url", envvar="AWS_ENDPOINT_URL", help="S3 endpoint for s3:// paths (MinIO, moto; env AWS_ENDPOINT_URL); "
                                                         "default AWS")


class ChatTemplate(str, Enum):
    auto = "auto"
    vicuna = "vicuna_v1.1"
    tokenizer = "tokenizer"


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Undated(str, Enum):
    skip = "skip"
    fail = "fail"


class DateOrder(str, Enum):
    MDY = "MDY"
    DMY = "DMY"


class Invalid(str, Enum):
    drop = "drop"
    fail = "fail"


Template = typer.Option(ChatTemplate.auto, "--chat-template",
                        help="chat template of prompts: auto = the tokenizer's if it has one, else vicuna_v1.1")


def example(command: str, note: str = "") -> str:
    """A command's help epilog: a note, then an example kept on its own lines (\\b stops rewrapping)."""
    return (note + "\n\n" if note else "") + "\b\nExample:\n  " + command


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """A table on stdout, drawn by rich (wide enough not to wrap URIs)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(*headers, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    Console(width=max(160, Console().width), soft_wrap=True).print(table)


def tally_text(tally: dict[str, Any]) -> str:
    return f"{tally['correct']}/{tally['total']}" + (f" ({tally['accuracy']:.0%})" if tally.get("accuracy") is not None else "")


def short(text: Any, width: int = 44) -> str:
    text = str(text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def endpoint_settings(endpoint_url: str | None):
    from labtune.store.backends import StoreSettings

    return StoreSettings("", endpoint_url=endpoint_url)


def finish(as_json: bool, uri: str, existed: bool, started: float, note: str = "") -> None:
    seconds = round(time.time() - started, 2)
    if as_json:
        print(json.dumps({"uri": uri, "cached": existed, "seconds": seconds}))
    else:
        print(f"{uri}{' (already there)' if existed else ''}{note} in {seconds:.1f}s")


def _version(value: bool) -> None:
    if value:
        print(f"labtune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print labtune's version and exit")) -> None:
    """Fine-tune LLaMA-family chat models on a lab's own notes, tracked by Prefect."""


