"""Commands that use a trained model: `ask`, `chat`, `export` (GGUF), `compare` of evaluations, and `sweep`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from labtune.cli.common import (
    ChatTemplate,
    Endpoint,
    Json,
    Overrides,
    Port,
    Recipe,
    Template,
    app,
    endpoint_settings,
    err,
    example,
    short,
)
from labtune.errors import LabtuneError

ModelArg = typer.Argument(..., help="a model in the store (s3:// or a folder with manifest.json) or a transformers folder")
MaxNew = typer.Option("auto", "--max-new-tokens", help="longest answer, in tokens; auto: a training run's longest "
                                                        "answer plus a quarter (at least 16), else 128")


NotesDir = typer.Option(None, "--notes", metavar="DIR", help="a folder of lab notes: the most relevant ones go in the "
                                                            "prompt (BM25), as in evaluation.retrieval")
# 1: the note of the asked date alone, as RAFT trains (data.augment.raft_distractors adds others)
TopK = typer.Option(1, "--top-k", min=1, help="with --notes: notes per question")
SystemPrompt = typer.Option(None, "--system-prompt", help="the system turn to ask with; default: the one training "
                                                          "used (the model card's), else the chat template's own")


def trained_system_prompt(folder: Path, given: Optional[str]) -> Optional[str]:
    """The system turn to ask with: the one given, else the one training used (the model card a
    train stage's output carries; a model without one: the chat template's default)."""
    if given is not None:
        return given
    from labtune.models.card import card_header, card_of_folder

    return (card_header(card_of_folder(folder)).get("labtune") or {}).get("system_prompt")


def notes_index(folder: Path) -> Any:
    """--notes: the BM25 index of a folder's notes, one line naming the folder when it holds none."""
    from labtune.data.notes import meeting_documents
    from labtune.evaluation.retrieval import NotesIndex

    if not folder.is_dir():
        raise LabtuneError(f"{folder}: lab-notes folder not found")
    documents = meeting_documents(folder)
    if not documents:
        raise LabtuneError(f"{folder}: no readable dated lab notes (.md, .org, .txt, .docx, .eml ...) in this folder")
    return NotesIndex(documents)


def checked_question(text: str, where: str) -> str:
    """A question as the model will get it: not empty, and valid UTF-8 (the shell hands over bytes
    that are not as lone surrogates, which the tokenizer cannot take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = ord(text[exc.start]) - 0xDC00 if 0xDC80 <= ord(text[exc.start]) <= 0xDCFF else None
        shown = f"byte 0x{byte:02x}" if byte is not None else "a character"
        raise LabtuneError(f"{where}: not valid UTF-8 ({shown} at character {exc.start + 1}); "
                           "write it in UTF-8, as terminals do") from None
    if not text.strip():
        raise LabtuneError(f"{where}: empty; ask something")
    return text


EMPTY_ANSWER = "(no answer: the model ended its turn at once; try another wording, or --notes)"


@app.command(epilog=example('labtune ask ~/.labtune/store/train/KEY --notes examples/labnotes '
                            '"Who is the presenter on 4/14/2023 lab meeting?"'))
def ask(model: str = ModelArg, question: list[str] = typer.Argument(..., help="one or more questions"),
        notes: Optional[Path] = NotesDir, top_k: int = TopK,
        system_prompt: Optional[str] = SystemPrompt,
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="questions generated together"),
        max_new_tokens: str = MaxNew, chat_template: ChatTemplate = Template, endpoint_url: Optional[str] = Endpoint,
        as_json: bool = Json) -> None:
    """Greedy answers from a model to one or more questions (with --notes, the notes retrieved into the prompt)."""
    from labtune.evaluation import generation
    from labtune.tools import answer_budget_for_model, model_folder, token_limit

    if max_new_tokens != "auto":
        token_limit(max_new_tokens)  # a bad limit fails before the model loads
    for number, text in enumerate(question, 1):
        checked_question(text, f"question {number}" if len(question) > 1 else "the question")

    index = notes_index(notes) if notes is not None else None
    folder = model_folder(model, endpoint_settings(endpoint_url), err)
    budget = answer_budget_for_model(folder, max_new_tokens, endpoint_settings(endpoint_url), err)
    loaded, tokenizer = generation.load_model(folder)
    generated = generation.ask(loaded, tokenizer, list(question), budget, batch_size, chat_template.value,
                               trained_system_prompt(folder, system_prompt),
                               notes=[index.context(q, top_k) for q in question] if index is not None else None)
    for text, cut in zip(question, generated.truncated):
        if cut:
            err(f"ask: the answer to {short(text, 60)!r} hit --max-new-tokens={budget}; raise it")
    for text, answer in zip(question, generated.answers):
        shown = answer or EMPTY_ANSWER  # a blank line would read as a hang or a crash
        read = {"notes": [d["file"] for d in index.search(text, top_k)]} if index is not None else {}
        print(json.dumps({"question": text, "answer": answer, **read}, ensure_ascii=False) if as_json else
              (f"Q: {text}\nA: {shown}" if len(question) > 1 else shown))
        if read and not as_json:  # where the answer was read from, out of the way of the answers
            err(f"notes: {', '.join(read['notes'])}")


@app.command(epilog=example("labtune chat ~/.labtune/store/train/KEY"))
def chat(model: str = ModelArg, max_new_tokens: str = MaxNew, chat_template: ChatTemplate = Template,
         notes: Optional[Path] = NotesDir,
         top_k: int = TopK,
         system_prompt: Optional[str] = SystemPrompt, endpoint_url: Optional[str] = Endpoint) -> None:
    """Talk with a model on stdin/stdout; /reset forgets the conversation, /exit leaves. With --notes,
    the notes most relevant to each question (the note of a date it names first) are in the
    system turn while the model answers it."""
    from labtune.evaluation import generation
    from labtune.tools import answer_budget_for_model, model_folder, token_limit

    if max_new_tokens != "auto":
        token_limit(max_new_tokens)  # a bad limit fails before the model loads
    from labtune.data.raft import notes_system

    index = notes_index(notes) if notes is not None else None
    folder = model_folder(model, endpoint_settings(endpoint_url), err)
    max_new_tokens = answer_budget_for_model(folder, max_new_tokens, endpoint_settings(endpoint_url), err)
    loaded, tokenizer = generation.load_model(folder)
    system = trained_system_prompt(folder, system_prompt)
    conversation: list[dict[str, str]] = []
    # bytes that are not UTF-8 come through as lone surrogates, named by checked_question
    sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        err("labtune chat: /reset forgets the conversation, /exit leaves")
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
        try:
            checked_question(line.strip(), "chat: that line")
        except LabtuneError as exc:  # one line, and the conversation goes on
            err(str(exc))
            continue
        conversation.append({"role": "user", "content": line.strip()})
        turn_system = system
        if index is not None:  # this question's notes in the system turn, and on stderr where they came from
            turn_system = notes_system(system, index.context(line.strip(), top_k))
            err(f"notes: {', '.join(d['file'] for d in index.search(line.strip(), top_k))}")
        answer = generation.generate(loaded, tokenizer, [generation.with_system(conversation, turn_system)],
                                     max_new_tokens, 1, chat_template.value)[0][0]
        conversation.append({"role": "assistant", "content": answer})
        print(answer, flush=True)


@app.command(epilog=example("labtune export ~/.labtune/store/train/KEY --to gguf --quant q8_0 --out ~/labnotes-gguf "
                            "--evaluation ~/.labtune/store/evaluate/KEY",
                            "Then: ollama create labnotes -f ~/labnotes-gguf/Modelfile; or llama-cli -m FILE.gguf -cnv"))
def export(model: str = ModelArg, to: str = typer.Option("gguf", "--to", help="the format: gguf (llama.cpp, Ollama, LM Studio)"),
           quant: str = typer.Option("q8_0", "--quant", help="f16, q8_0 (8-bit blocks, half the size) or f32"),
           out: Path = typer.Option(..., "--out", help="the folder to write the .gguf, Modelfile and README.md into"),
           name: Optional[str] = typer.Option(None, "--name", help="the model's name (default: the folder's)"),
           evaluation: Optional[str] = typer.Option(None, "--evaluation", metavar="EVAL_URI",
                                                    help="an evaluate output: its table goes into the model card"),
           system_prompt: Optional[str] = SystemPrompt,
           chat_template: Optional[ChatTemplate] = typer.Option(None, "--chat-template", help="the template training "
                                                                "used (default: the model card's, else auto)"),
           endpoint_url: Optional[str] = Endpoint, as_json: bool = Json) -> None:
    """Write a model as GGUF, with an Ollama Modelfile and its model card beside it."""
    import time

    from labtune.models.card import card_header, card_of_folder, with_evaluation
    from labtune.models.gguf_export import QUANTS, export_folder
    from labtune.tools import model_folder

    if to != "gguf":
        raise LabtuneError(f"--to {to}: the one export format is gguf")
    if quant not in QUANTS:
        raise LabtuneError(f"--quant {quant}: expected one of {', '.join(QUANTS)}")
    started = time.time()
    folder = model_folder(model, endpoint_settings(endpoint_url), err)
    card = card_of_folder(folder)
    if evaluation is not None:
        from labtune.stages.evaluate import columns_of, run_from_folder
        from labtune.store.outputs import fetch_output

        summary = run_from_folder(fetch_output(evaluation, endpoint_settings(endpoint_url), log=err), evaluation)["summary"]
        card = with_evaluation(card, summary, columns_of(summary))
    trained = card_header(card).get("labtune") or {}  # how training asked: the Modelfile asks the same way
    written = export_folder(folder, out.expanduser(), quant, name or trained.get("name") or folder.name,
                            trained.get("chat_template", "auto")
                            if chat_template is None else chat_template.value,
                            trained.get("system_prompt") if system_prompt is None else system_prompt, card)
    seconds = round(time.time() - started, 1)
    if as_json:
        print(json.dumps({"out": str(out), **written, "seconds": seconds}))
    else:
        beside = ", ".join(f for f in written["files"] if not f.endswith(".gguf"))
        print(f"{out / written['gguf']} ({written['bytes'] / 1e6:,.1f} MB) with {beside} in {seconds:.1f}s")


@app.command(epilog=example("labtune compare ~/.labtune/store/evaluate/KEY1 ~/.labtune/store/evaluate/KEY2"))
def compare(runs: list[str] = typer.Argument(..., metavar="RUN_URI...", help="evaluate stage outputs (folder or s3://)"),
            endpoint_url: Optional[str] = Endpoint, as_json: bool = Json) -> None:
    """Evaluation outputs side by side, question by question."""
    from labtune.evaluation import comparison
    from labtune.stages.evaluate import run_from_folder
    from labtune.store.outputs import fetch_output

    loaded = [run_from_folder(fetch_output(uri, endpoint_settings(endpoint_url), log=err), uri) for uri in runs]
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
    from labtune.errors import RecipeError

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
    from labtune.ops.server import ensure_api, tracked_runs, using_api
    from labtune.overrides import grid_variants
    from labtune.recipe import load_recipe

    values = parse_grid(grid)
    for variant in grid_variants(values):  # a bad recipe, key or value fails here, before Prefect is contacted
        load_recipe(recipe, list(overrides or []) + [f"{key}={value}" for key, value in variant.items()])
    url = ensure_api(port, say=err)
    from flows.sweep import sweep as sweep_flow
    from labtune.console import run_console

    with using_api(url), tracked_runs(), run_console("sweep") as log_path:
        err(f"This sweep's whole log: {log_path}")
        result = sweep_flow(str(recipe), values, list(overrides or []))
    print(json.dumps(result, ensure_ascii=False) if as_json else result["markdown"])


