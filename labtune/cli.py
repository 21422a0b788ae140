"""labtune's command line.

    labtune run RECIPE [key=value ...] [--json]     the whole finetune flow, tracked by Prefect
    labtune weights|delta|data|tokenize|train|evaluate RECIPE [key=value ...]   one stage, no Prefect needed
    labtune convert [--notes DIR] [--sharegpt F] [--alpaca F] [--messages P] --out O   data -> ShareGPT JSON
    labtune tokenize --data D --model M --out O     ShareGPT JSON -> masked, tokenized datasets
    labtune weights SOURCE OUT                      any model source -> HF safetensors in OUT (dir or s3://)
    labtune merge-delta --base B --delta D --out O  Vicuna-style delta weights: O = B + D
    labtune make-delta --base B --target T --out O  the inverse: O = T - B (round trip exact)
    labtune merge-lora --base B --adapter A --out O fold a PEFT LoRA adapter into B
    labtune ask MODEL "question" ...                greedy answers from a model in the store or on disk
    labtune chat MODEL                              a conversation with a model on stdin/stdout
    labtune compare RUN_URI ...                     evaluation outputs side by side, question by question
    labtune sweep RECIPE --grid KEY=V1,V2 ...       every variant of a grid, then their comparison
    labtune stack up|down|status [--recipe R]       server, S3 endpoint, pools, workers, deployments
    labtune deploy RECIPE                           work pools + deployments/prefect.yaml for a recipe
    labtune server start|stop|status                the local Prefect server
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labtune.errors import LabtuneError


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _short(text: str | None, width: int = 44) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_run(args: argparse.Namespace) -> int:
    from labtune.recipe import load_recipe
    from labtune.server import ensure_api

    started = time.time()
    recipe = load_recipe(args.recipe, args.overrides)
    url = ensure_api(args.port, say=_err)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.finetune import finetune, preflight
    from labtune.store import open_recipe_store
    from tasks.evaluate import read_evaluation

    preflight(recipe)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        state = finetune(str(args.recipe), args.overrides, return_state=True)
        stages = state.result()
    flow_run = {"id": str(state.state_details.flow_run_id),
                "url": f"{url.removesuffix('/api')}/runs/flow-run/{state.state_details.flow_run_id}"}
    summary, rows = read_evaluation(open_recipe_store(recipe), stages["evaluate"]["uri"])
    evaluation = {k: summary[k] for k in ("base_correct", "tuned_correct", "total")}
    if args.json:
        print(json.dumps({"stages": stages, "evaluation": evaluation, "flow_run": flow_run,
                          "seconds": round(time.time() - started, 2)}))
        return 0
    print()
    print(_table([[name, s["uri"], "yes" if s["cached"] else "no", f"{s['seconds']:.1f}"] for name, s in stages.items()],
                 ["stage", "uri", "cached", "seconds"]))
    print()
    print(_table([[_short(r["question"]), _short(r["expected"], 20), _short(r["base_answer"]), _short(r["tuned_answer"]),
                   {True: "yes", False: "no", None: "-"}[r["tuned_correct"]]] for r in rows],
                 ["question", "expected", "base answer", "fine-tuned answer", "correct"]))
    print(f"\nbase model: {evaluation['base_correct']}/{evaluation['total']} correct; "
          f"fine-tuned: {evaluation['tuned_correct']}/{evaluation['total']} correct "
          f"({time.time() - started:.0f}s)")
    print(f"See the run in the Prefect UI: {flow_run['url']}")
    return 0


def _stage_runner(args: argparse.Namespace) -> tuple[Any, Any, Callable[[str], None]]:
    from labtune.recipe import load_recipe
    from labtune.store import open_recipe_store

    recipe = load_recipe(args.recipe, args.overrides)
    store = open_recipe_store(recipe)
    store.check()
    return recipe, store, _err


def cmd_stage(args: argparse.Namespace) -> int:
    """Run one stage as a plain function; upstream URIs not given are computed (usually cached)."""
    from tasks.data import build_data
    from tasks.delta import build_delta
    from tasks.evaluate import build_evaluate
    from tasks.tokenize import build_tokenize
    from tasks.train import build_train, tqdm_progress
    from tasks.weights import build_weights

    recipe, store, log = _stage_runner(args)

    def target_uri() -> str:
        return build_delta(recipe, store, build_weights(recipe, store, log).uri, log).uri

    def tokens_uri(model_uri: str) -> str:
        return build_tokenize(recipe, store, model_uri, build_data(recipe, store, log).uri, log).uri

    if args.command == "weights":
        result = build_weights(recipe, store, log)
    elif args.command == "delta":
        result = build_delta(recipe, store, args.base or build_weights(recipe, store, log).uri, log)
    elif args.command == "data":
        result = build_data(recipe, store, log)
    elif args.command == "tokenize":
        model_uri = args.model or target_uri()
        result = build_tokenize(recipe, store, model_uri, args.data or build_data(recipe, store, log).uri, log)
    elif args.command == "train":
        model_uri = args.model or target_uri()
        tokens = args.tokens or tokens_uri(model_uri)
        with tqdm_progress() as on_progress:
            result = build_train(recipe, store, model_uri, tokens, log, on_progress=on_progress)
    else:
        base_uri = args.base or target_uri()
        data_uri = build_data(recipe, store, log).uri
        tokens = build_tokenize(recipe, store, base_uri, data_uri, log).uri
        model_uri = args.model or build_train(recipe, store, base_uri, tokens, log).uri
        result = build_evaluate(recipe, store, base_uri, model_uri, log, data_uri=data_uri, tokens_uri=tokens)
    print(json.dumps(result.to_dict()) if args.json else f"{result.stage}: {result.uri}{' (cached)' if result.cached else ''}")
    return 0


def model_folder(uri: str, endpoint_url: str | None = None) -> Path:
    """A model to load: a store output (s3:// or a folder with manifest.json, verified), or a plain
    transformers folder on disk. A store output without its manifest is incomplete and refused."""
    from labtune.stage import ManifestError, fetch_output

    path = Path(uri).expanduser()
    if uri.startswith("s3://") or (path / "manifest.json").is_file():
        return fetch_output(uri, endpoint_url, log=_err)
    if path.is_dir() and path.parent.name in ("weights", "delta", "train") and not (path / "manifest.json").is_file():
        raise ManifestError(f"{uri}: no complete output here (manifest.json missing)")
    if not (path / "config.json").is_file():
        raise ManifestError(f"{uri}: not a model (no manifest.json, no config.json)")
    return path


def cmd_ask(args: argparse.Namespace) -> int:
    from labtune import evaluation

    model, tokenizer = evaluation.load_model(model_folder(args.model, args.endpoint_url))
    answers = evaluation.ask(model, tokenizer, args.question, args.max_new_tokens, args.batch_size, args.chat_template)
    for question, answer in zip(args.question, answers):
        print(json.dumps({"question": question, "answer": answer}, ensure_ascii=False) if args.json else
              (f"Q: {question}\nA: {answer}" if len(args.question) > 1 else answer))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A conversation on stdin/stdout; /reset forgets it, /exit (or end of input) leaves."""
    from labtune import evaluation

    model, tokenizer = evaluation.load_model(model_folder(args.model, args.endpoint_url))
    messages: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("labtune chat: /reset forgets the conversation, /exit leaves", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        answer = evaluation.generate(model, tokenizer, [messages], args.max_new_tokens, 1, args.chat_template)[0][0]
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)


def cmd_compare(args: argparse.Namespace) -> int:
    from labtune import evaluation
    from labtune.stage import fetch_output
    from tasks.evaluate import run_from_folder

    runs = [run_from_folder(fetch_output(uri, args.endpoint_url, log=_err), uri) for uri in args.runs]
    labels, table = evaluation.comparison_table(runs)
    if args.json:
        print(json.dumps({"columns": labels, "rows": table, "runs": [{"uri": r["uri"], "label": label,
                          "tuned_correct": r["summary"]["tuned_correct"], "total": r["summary"]["total"]}
                                                                  for r, label in zip(runs, labels)]}, ensure_ascii=False))
        return 0
    columns = ["question", "expected", "base", *labels]
    print(evaluation.markdown_table(columns, table))
    print()
    for run, label in zip(runs, labels):
        print(f"- {label}: {run['summary']['tuned_correct']}/{run['summary']['total']} correct ({run['uri']})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from labtune.recipe import RecipeError, load_recipe
    from labtune.server import ensure_api

    grid: dict[str, list[str]] = {}
    for item in args.grid:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise RecipeError(f"--grid {item!r}: expected key=value1,value2 (e.g. train.num_train_epochs=3,50)")
        grid[key] = values.split(",")
    load_recipe(args.recipe, args.overrides)  # a bad recipe fails here, in one line
    url = ensure_api(args.port, say=_err)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.sweep import sweep

    with temporary_settings(updates={PREFECT_API_URL: url}):
        result = sweep(str(args.recipe), grid, args.overrides)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(result["markdown"])
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from labtune import stack

    if args.action == "up":
        stack.up(args.recipe, port=args.port, s3_port=None if args.no_s3 else args.s3_port, say=print)
    elif args.action == "down":
        if not stack.down(say=print):
            print("nothing from the labtune stack was running")
    else:
        print(json.dumps(stack.status(args.port), indent=2))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from labtune import stack
    from labtune.server import ensure_api

    url = ensure_api(args.port, say=_err)
    stack.create_pools(url)
    print(stack.deploy(args.recipe, url).strip())
    return 0


def _is_recipe(path: str) -> bool:
    return path.endswith((".yaml", ".yml")) and os.path.isfile(path)


def _s3(args: argparse.Namespace) -> dict[str, str | None]:
    return {"endpoint_url": args.endpoint_url, "region": None}


def _finish(args: argparse.Namespace, uri: str, existed: bool, started: float, extra: str = "") -> int:
    seconds = round(time.time() - started, 2)
    if args.json:
        print(json.dumps({"uri": uri, "cached": existed, "seconds": seconds}))
    else:
        print(f"{uri}{' (already there)' if existed else ''}{extra} in {seconds:.1f}s")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    """`weights RECIPE [k=v]` runs the stage; `weights SOURCE OUT` converts one source into OUT."""
    if _is_recipe(args.recipe):
        return cmd_stage(args)
    if len(args.overrides) != 1:
        raise LabtuneError("weights: expected RECIPE.yaml [key=value ...] or SOURCE OUT")
    from labtune.recipe import ModelSource
    from labtune.stage import publish
    from labtune.sources import WeightsError, materialize, source_identity

    started = time.time()
    try:
        source = ModelSource(source=args.recipe, dtype=args.dtype, gguf_file=args.gguf_file)
    except ValueError as exc:
        raise WeightsError(f"{args.recipe}: {str(exc).splitlines()[-1].strip()}") from None
    identity = source_identity(source, _s3(args))
    def build(out) -> dict[str, str]:
        materialize(source, out, _s3(args), _err)
        return {"source": args.recipe}

    # the identity alone decides whether OUT already holds this model (hf://x and hf://x@main agree)
    uri, existed = publish(args.overrides[0], build, stage="weights", inputs={"identity": identity},
                           parameters={"dtype": args.dtype}, s3=_s3(args), log=_err)
    return _finish(args, uri, existed, started)


def _merge_command(args: argparse.Namespace, kind: str) -> int:
    from labtune import merge
    from labtune.recipe import ModelSource
    from labtune.stage import publish
    from labtune.tensorfiles import CheckpointError, parse_size
    from labtune.sources import local_source, source_identity

    started = time.time()
    second = {"merge-delta": "delta", "make-delta": "target", "merge-lora": "adapter"}[kind]
    sources = {"base": args.base, second: getattr(args, second)}
    identities = {name: source_identity(ModelSource(source=uri), _s3(args)) for name, uri in sources.items()}
    try:
        shard_bytes = parse_size(args.max_shard_size)
    except ValueError as exc:
        raise LabtuneError(f"--max-shard-size: {exc}") from None
    result: dict[str, Any] = {}

    def build(out):
        with local_source(args.base, _s3(args), _err) as base, local_source(sources[second], _s3(args), _err) as other:
            try:
                progress = merge.TqdmProgress(kind)
                if kind == "merge-delta":
                    merge.apply_delta(base, other, out, shard_bytes, progress)
                elif kind == "make-delta":
                    result["widened"] = merge.make_delta(base, other, out, shard_bytes, progress)
                else:
                    result.update(merge.merge_lora(base, other, out, shard_bytes, progress))
            except CheckpointError as exc:
                raise merge.DeltaError(str(exc)) from None
        return {"merge": {"kind": kind, **result}}

    uri, existed = publish(args.out, build, stage=kind, inputs={**sources, "identity": identities},
                           parameters={"max_shard_size": args.max_shard_size}, s3=_s3(args), log=_err)
    extra = ""
    if result.get("widened"):
        extra = f" ({len(result['widened'])} tensor(s) stored in a wider dtype so the round trip is exact)"
    if "merged" in result:
        extra = f" ({result['merged']} LoRA pair(s) merged, {result['replaced']} tensor(s) replaced)"
    return _finish(args, uri, existed, started, extra)


def cmd_convert(args: argparse.Namespace) -> int:
    """Any mix of data sources -> cleaned ShareGPT JSON (train.json, eval.json) and report.json."""
    from labtune.conversations import convert
    from labtune.recipe import DataConfig
    from labtune.stage import publish
    from tasks.data import report_markdown

    started = time.time()
    sources = [{"type": kind, "path": str(Path(p).resolve())} for kind, paths in
               (("lab_notes", args.notes), ("sharegpt", args.sharegpt), ("alpaca", args.alpaca),
                ("messages", args.messages)) for p in paths]
    if not sources:
        raise LabtuneError("convert: name at least one source (--notes, --sharegpt, --alpaca or --messages)")
    try:
        config = DataConfig(sources=sources, eval_fraction=args.eval_fraction, qa_pairs=not args.no_qa,
                            note_conversations=not args.no_note_conversations, undated_notes=args.undated_notes,
                            invalid_conversations=args.invalid_conversations, seed=args.seed)
    except ValueError as exc:
        raise LabtuneError(f"convert: {str(exc).splitlines()[-1].strip()}") from None
    summary: dict[str, Any] = {}

    def build(out: Path) -> dict[str, Any]:
        train, evaluation, reports = convert(config, [Path(s["path"]) for s in sources], _err)
        report = [r.as_dict() for r in reports]
        (out / "train.json").write_text(json.dumps(train, indent=1, ensure_ascii=False))
        (out / "eval.json").write_text(json.dumps(evaluation, indent=1, ensure_ascii=False))
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "report.md").write_text(report_markdown(report, str(out)))
        summary.update(train=len(train), eval=len(evaluation))
        return {"report": report}

    from labtune.store import sha256_files

    identities = {s["path"]: (sha256_files(sorted(p for p in Path(s["path"]).rglob("*") if p.is_file()), cached=False)
                              if Path(s["path"]).is_dir() else sha256_files([Path(s["path"])], cached=False))
                  for s in sources if Path(s["path"]).exists()}
    uri, existed = publish(args.out, build, stage="convert", inputs={"sources": identities},
                           parameters=config.model_dump(mode="json", exclude={"sources"}), log=_err)
    extra = f": {summary['train']} train and {summary['eval']} eval conversations" if summary else ""
    return _finish(args, uri, existed, started, extra)


def cmd_tokenize(args: argparse.Namespace) -> int:
    """`tokenize RECIPE [k=v]` runs the stage; `tokenize --data D --model M --out O` is the tool."""
    if args.recipe and _is_recipe(args.recipe):
        return cmd_stage(args)
    if args.recipe or not (args.data and args.model and args.out):
        raise LabtuneError("tokenize: expected RECIPE.yaml [key=value ...], or --data DIR_OR_JSON --model DIR --out OUT")
    data = Path(args.data)
    if not data.is_file():
        return _tokenize_tool(args, data)
    with tempfile.TemporaryDirectory(prefix="labtune-tokenize-") as staged:  # one ShareGPT file: all of it trains
        (Path(staged) / "train.json").symlink_to(data.resolve())
        return _tokenize_tool(args, Path(staged))


def _tokenize_tool(args: argparse.Namespace, data: Path) -> int:
    from labtune.merge import TOKENIZER_FILES
    from labtune.stage import publish
    from labtune.store import sha256_files
    from tasks.tokenize import tokenize_files

    started = time.time()
    model = Path(args.model)
    if not model.is_dir():
        raise LabtuneError(f"{args.model}: model folder not found (the tokenizer is read from it)")
    if not (data / "train.json").is_file():
        raise LabtuneError(f"{args.data}: expected a ShareGPT JSON file or a folder with train.json (labtune convert's output)")
    tokenizer_files = [model / name for name in TOKENIZER_FILES if (model / name).is_file()]
    inputs = {"data": sha256_files([p for p in (data / "train.json", data / "eval.json") if p.exists()], cached=False),
              "tokenizer": sha256_files(tokenizer_files, cached=False)}
    parameters = {"model_max_length": args.max_length, "chat_template": args.chat_template}
    uri, existed = publish(args.out, lambda out: {"report": tokenize_files(data, model, out, args.chat_template,
                                                                             args.max_length, args.num_proc, _err)},
                           stage="tokenize", inputs=inputs, parameters=parameters, log=_err)
    return _finish(args, uri, existed, started)


def cmd_server(args: argparse.Namespace) -> int:
    from labtune import server

    if args.action == "start":
        url, started = server.start(args.port)
        print(f"Prefect server {'started' if started else 'already running'}: UI {url.removesuffix('/api')}, "
              f"API {url}; stop it with: labtune server stop")
    elif args.action == "stop":
        print("Prefect server stopped" if server.stop() else "no Prefect server started by labtune is running")
    else:
        print(json.dumps(server.status(args.port), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labtune", description="Fine-tune LLaMA-family chat models on a lab's notes.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole finetune flow (starts a local Prefect server if needed)")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.num_train_epochs=5")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    run.add_argument("--port", type=int, default=int(os.environ.get("LABTUNE_PREFECT_PORT", "4200")))
    run.set_defaults(func=cmd_run)

    for name, help_text in (("weights", "bring the base model into the store"),
                            ("delta", "apply the recipe's delta weights"),
                            ("data", "build the training conversations"),
                            ("tokenize", "tokenize and mask the conversations for the target model"),
                            ("train", "fine-tune with torchrun + FSDP2"),
                            ("evaluate", "ask the recipe's questions to base and fine-tuned model")):
        stage = sub.add_parser(name, help=help_text)
        stage.add_argument("recipe", nargs="?" if name == "tokenize" else None)
        stage.add_argument("overrides", nargs="*")
        stage.add_argument("--json", action="store_true")
        if name in ("delta", "evaluate"):
            stage.add_argument("--base", help="URI of the base (target) model in the store")
        if name in ("tokenize", "train", "evaluate"):
            stage.add_argument("--model", help="URI (or, for the tokenize tool, folder) of the model to tokenize for or "
                                               "train (train), or of the fine-tuned model (evaluate)")
        if name == "tokenize":
            stage.add_argument("--data", help="URI of the data stage's output; for the tool, a ShareGPT file or folder")
            stage.add_argument("--out", help="tool: output folder or s3:// prefix")
            stage.add_argument("--max-length", type=int, default=2048, help="tool: model_max_length (default 2048)")
            stage.add_argument("--chat-template", default="auto", choices=["auto", "vicuna_v1.1", "tokenizer"])
            stage.add_argument("--num-proc", type=int, help="tool: tokenizer processes (default: by data size)")
        if name == "train":
            stage.add_argument("--tokens", help="URI of the tokenize stage's output")
        stage.set_defaults(func=cmd_tokenize if name == "tokenize" else cmd_stage)
        if name == "weights":
            stage.usage = "labtune weights RECIPE.yaml [key=value ...] | labtune weights SOURCE OUT [--dtype D]"
            stage.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="SOURCE OUT: cast to dtype")
            stage.add_argument("--gguf-file", help="SOURCE OUT: the .gguf file inside SOURCE")
            stage.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
                               help="S3 endpoint for s3:// SOURCE or OUT (MinIO, moto); default AWS")
            stage.set_defaults(func=cmd_weights)

    conv = sub.add_parser("convert", help="lab notes, ShareGPT, Alpaca, messages data -> cleaned ShareGPT JSON")
    conv.add_argument("--notes", action="append", default=[], metavar="DIR", help="a folder of lab notes")
    conv.add_argument("--sharegpt", action="append", default=[], metavar="FILE")
    conv.add_argument("--alpaca", action="append", default=[], metavar="FILE", help="Alpaca .json or .jsonl")
    conv.add_argument("--messages", action="append", default=[], metavar="PATH",
                      help="OpenAI-style messages: a datasets folder, .parquet or .jsonl")
    conv.add_argument("--out", required=True, help="output folder (train.json, eval.json, report.json, report.md)")
    conv.add_argument("--eval-fraction", type=float, default=0.0)
    conv.add_argument("--no-qa", action="store_true", help="no question-answer pairs from note fields")
    conv.add_argument("--no-note-conversations", action="store_true", help="no whole-note conversations")
    conv.add_argument("--undated-notes", choices=["skip", "fail"], default="skip")
    conv.add_argument("--invalid-conversations", choices=["drop", "fail"], default="drop")
    conv.add_argument("--seed", type=int, default=42)
    conv.add_argument("--json", action="store_true")
    conv.set_defaults(func=cmd_convert)

    for kind, second, help_text in (("merge-delta", "delta", "write BASE + DELTA (Vicuna-style delta weights)"),
                                    ("make-delta", "target", "write TARGET - BASE, a delta others can merge"),
                                    ("merge-lora", "adapter", "fold a PEFT LoRA adapter into BASE")):
        tool = sub.add_parser(kind, help=help_text)
        tool.add_argument("--base", required=True, help="base model: directory, s3:// or hf://")
        tool.add_argument(f"--{second}", required=True, help=f"{second}: directory, s3:// or hf://")
        tool.add_argument("--out", required=True, help="output directory or s3:// prefix (must be new or empty)")
        tool.add_argument("--max-shard-size", default="2GB", help="largest output shard (default 2GB)")
        tool.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
                          help="S3 endpoint for s3:// paths (MinIO, moto); default AWS")
        tool.add_argument("--json", action="store_true")
        tool.set_defaults(func=lambda args, kind=kind: _merge_command(args, kind))

    for name, help_text in (("ask", "ask a model one or more questions"), ("chat", "talk with a model")):
        tool = sub.add_parser(name, help=help_text)
        tool.add_argument("model", help="a model in the store (s3:// or a folder with manifest.json) or a transformers folder")
        if name == "ask":
            tool.add_argument("question", nargs="+")
            tool.add_argument("--batch-size", type=int, default=8)
            tool.add_argument("--json", action="store_true")
        tool.add_argument("--max-new-tokens", type=int, default=128)
        tool.add_argument("--chat-template", default="auto", choices=["auto", "vicuna_v1.1", "tokenizer"])
        tool.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3 endpoint for s3:// models")
        tool.set_defaults(func=cmd_ask if name == "ask" else cmd_chat)

    compare = sub.add_parser("compare", help="evaluation outputs side by side, question by question")
    compare.add_argument("runs", nargs="+", metavar="RUN_URI", help="evaluate stage outputs (folder or s3://)")
    compare.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"))
    compare.add_argument("--json", action="store_true")
    compare.set_defaults(func=cmd_compare)

    sweep = sub.add_parser("sweep", help="run a recipe over a grid of overrides and compare the runs")
    sweep.add_argument("recipe")
    sweep.add_argument("overrides", nargs="*")
    sweep.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                       help="a recipe key and its values, e.g. train.num_train_epochs=3,50 (repeat for a grid)")
    sweep.add_argument("--json", action="store_true")
    sweep.add_argument("--port", type=int, default=int(os.environ.get("LABTUNE_PREFECT_PORT", "4200")))
    sweep.set_defaults(func=cmd_sweep)

    stack_cmd = sub.add_parser("stack", help="the local stack: Prefect server, S3 endpoint, work pools, workers, deployments")
    stack_cmd.add_argument("action", choices=["up", "down", "status"])
    stack_cmd.add_argument("--recipe", help="up: deploy the flows with this recipe as their default")
    stack_cmd.add_argument("--port", type=int, default=int(os.environ.get("LABTUNE_PREFECT_PORT", "4200")))
    stack_cmd.add_argument("--s3-port", type=int, default=9000, help="up: port of the local S3 endpoint (moto)")
    stack_cmd.add_argument("--no-s3", action="store_true", help="up: no local S3 endpoint (MinIO or AWS instead)")
    stack_cmd.set_defaults(func=cmd_stack)

    deploy_cmd = sub.add_parser("deploy", help="create the work pools and register the deployments for a recipe")
    deploy_cmd.add_argument("recipe")
    deploy_cmd.add_argument("--port", type=int, default=int(os.environ.get("LABTUNE_PREFECT_PORT", "4200")))
    deploy_cmd.set_defaults(func=cmd_deploy)

    srv = sub.add_parser("server", help="the local Prefect server")
    srv.add_argument("action", choices=["start", "stop", "status"])
    srv.add_argument("--port", type=int, default=int(os.environ.get("LABTUNE_PREFECT_PORT", "4200")))
    srv.set_defaults(func=cmd_server)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except LabtuneError as exc:
        _err(f"labtune: error: {exc}")
        code = 2
    except KeyboardInterrupt:
        _err("labtune: interrupted")
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
