"""The command line's one-off tools, Prefect-free: bring a model into HF format, merge or make
delta weights, convert data to ShareGPT, tokenize a ShareGPT file, find a model to ask.

Each writes to a folder or s3:// prefix the user names, under the stage contract (manifest.json
last; an OUT that already holds the same output is left as it is).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from labtune.errors import LabtuneError
from labtune.store.backends import StoreSettings
from labtune.store.hashing import sha256_files
from labtune.store.outputs import Log, ManifestError, default_log, fetch_output, publish

MERGE_KINDS = {"merge-delta": "delta", "make-delta": "target", "merge-lora": "adapter"}


def import_model(source: str, out: str, dtype: str | None, gguf_file: str | None, settings: StoreSettings,
                 log: Log = default_log) -> tuple[str, bool]:
    """Any model source (folder, s3://, hf://, GGUF, Meta checkpoint) -> HF safetensors in OUT."""
    from labtune.models.sources import WeightsError, materialize, model_identity
    from labtune.recipe import ModelSource

    try:
        model = ModelSource(source=source, dtype=dtype, gguf_file=gguf_file)
    except ValueError as exc:
        raise WeightsError(f"{source}: {str(exc).splitlines()[-1].strip()}") from None
    identity = model_identity(model, settings)

    def build(folder: Path) -> dict[str, str]:
        materialize(model, folder, settings, log)
        return {"source": source}

    # the identity alone decides whether OUT already holds this model (hf://x and hf://x@main agree)
    return publish(out, build, stage="weights", inputs={"identity": identity}, parameters={"dtype": dtype},
                   settings=settings, log=log)


def merge_models(kind: str, base: str, other: str, out: str, max_shard_size: str, settings: StoreSettings,
                 log: Log = default_log) -> tuple[str, bool, str]:
    """merge-delta: OUT = BASE + DELTA; make-delta: OUT = TARGET - BASE; merge-lora: BASE with a
    PEFT adapter folded in. Returns (uri, already_there, a note on what was done)."""
    from labtune.models import merge
    from labtune.models.sources import local_source, model_identity
    from labtune.models.tensorfiles import CheckpointError, check_model_folder, parse_size
    from labtune.recipe import ModelSource

    second = MERGE_KINDS[kind]
    sources = {"base": base, second: other}
    identities = {name: model_identity(ModelSource(source=uri), settings) for name, uri in sources.items()}
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise LabtuneError(f"--max-shard-size: {exc}") from None
    result: dict[str, Any] = {}

    def build(folder: Path) -> dict[str, Any]:
        with local_source(base, settings, log) as base_dir, local_source(other, settings, log) as other_dir:
            try:
                progress = merge.TqdmProgress(kind)
                if kind == "merge-delta":
                    merge.apply_delta(base_dir, other_dir, folder, shard_bytes, progress)
                elif kind == "make-delta":
                    result["widened"] = merge.make_delta(base_dir, other_dir, folder, shard_bytes, progress)
                else:
                    result.update(merge.merge_lora(base_dir, other_dir, folder, shard_bytes, progress))
                check_model_folder(folder)  # whole before the manifest calls it complete
            except CheckpointError as exc:
                raise merge.DeltaError(str(exc)) from None
        return {"merge": {"kind": kind, **result}}

    uri, existed = publish(out, build, stage=kind, inputs={**sources, "identity": identities},
                           parameters={"max_shard_size": max_shard_size}, settings=settings, log=log)
    note = ""
    if result.get("widened"):
        note = f" ({len(result['widened'])} tensor(s) stored in a wider dtype so the round trip is exact)"
    if "merged" in result:
        note = f" ({result['merged']} LoRA pair(s) merged, {result['replaced']} tensor(s) replaced)"
    return uri, existed, note


# convert's options by the DataConfig field each sets, for errors that name what the user typed
CONVERT_OPTIONS = {"eval_fraction": ("--eval-fraction", "a share of the records: at least 0 and below 1"),
                   "seed": ("--seed", "a whole number")}


def convert_option_error(error: dict[str, Any]) -> str:
    """A DataConfig validation error as the convert option (and its allowed range) it came from."""
    field = str(error["loc"][0]) if error.get("loc") else ""
    if field in CONVERT_OPTIONS:
        flag, allowed = CONVERT_OPTIONS[field]
        return f"{flag}: must be {allowed} (got {error.get('input')!r})"
    if "qa_pairs" in error.get("msg", ""):
        return "--no-qa and --no-note-conversations together leave lab notes no conversations: drop one of them"
    return f"{'.'.join(str(p) for p in error.get('loc', ())) or 'options'}: {error.get('msg', '').removeprefix('Value error, ')}"


def convert_data(sources: list[dict[str, str]], out: str, options: dict[str, Any],
                 log: Log = default_log) -> tuple[str, bool, dict[str, int]]:
    """Any mix of data sources -> cleaned ShareGPT JSON (train.json, eval.json), report.json and
    report.md in OUT. `options` are DataConfig's (eval_fraction, qa_pairs, ...)."""
    from pydantic import ValidationError

    from labtune.data.conversations import convert
    from labtune.data.notes import note_files
    from labtune.recipe import DataConfig
    from labtune.stages.data import notes_line, read_facts_with_counts, report_markdown

    if not sources:
        raise LabtuneError("convert: name at least one source (--notes, --sharegpt, --alpaca or --messages)")
    try:
        config = DataConfig(sources=sources, **options)
    except ValidationError as exc:
        raise LabtuneError(f"convert: {convert_option_error(exc.errors()[0])}") from None
    summary: dict[str, int] = {}

    def build(folder: Path) -> dict[str, Any]:
        train, evaluation, reports = convert(config, [Path(s["path"]) for s in sources], log)
        report = [r.as_dict() for r in reports]
        (folder / "train.json").write_text(json.dumps(train, indent=1, ensure_ascii=False))
        (folder / "eval.json").write_text(json.dumps(evaluation, indent=1, ensure_ascii=False))
        (folder / "report.json").write_text(json.dumps(report, indent=2))
        (folder / "report.md").write_text(report_markdown(report, str(folder)))
        (folder / "facts.json").write_text(json.dumps(read_facts_with_counts(reports, []), indent=1, ensure_ascii=False))
        summary.update(train=len(train), eval=len(evaluation))
        if any(r.type == "lab_notes" for r in reports):
            summary["notes"] = notes_line(report)
        return {"report": report}

    def files(source: dict[str, str]) -> list[Path]:
        path = Path(source["path"])
        if not path.is_dir():
            return [path]
        return note_files(path) if source["type"] == "lab_notes" else sorted(p for p in path.rglob("*") if p.is_file())

    identities = {s["path"]: sha256_files(files(s), cached=False) for s in sources if Path(s["path"]).exists()}
    uri, existed = publish(out, build, stage="convert", inputs={"sources": identities},
                           parameters=config.model_dump(mode="json", exclude={"sources"}), log=log)
    return uri, existed, summary


def require_tokenizer(model: Path, what: str) -> list[Path]:
    """The tokenizer files of a model folder; none is an error naming the folder."""
    from labtune.models.merge import TOKENIZER_FILES

    found = [model / name for name in TOKENIZER_FILES if (model / name).is_file()]
    if not found:
        raise LabtuneError(f"{what}: no tokenizer in this model folder (expected one of: "
                           f"{', '.join(n for n in TOKENIZER_FILES if n.startswith('tokenizer'))})")
    return found


def tokenize_dataset(data: str, model: str, out: str, max_length: int, chat_template: str, num_proc: int | None,
                        log: Log = default_log) -> tuple[str, bool]:
    """A ShareGPT JSON file, or a folder with train.json (and eval.json), tokenized and loss-masked
    for MODEL's tokenizer into OUT."""
    from labtune.stages.tokenize import tokenize_files

    model_dir = Path(model)
    if not model_dir.is_dir():
        raise LabtuneError(f"{model}: model folder not found (the tokenizer is read from it)")
    tokenizer_files = require_tokenizer(model_dir, model)
    source = Path(data)
    with tempfile.TemporaryDirectory(prefix="labtune-tokenize-") as staged:
        if source.is_file():  # one ShareGPT file: all of it trains
            (Path(staged) / "train.json").symlink_to(source.resolve())
            source = Path(staged)
        if not (source / "train.json").is_file():
            raise LabtuneError(f"{data}: expected a ShareGPT JSON file or a folder with train.json (labtune convert's output)")
        inputs = {"data": sha256_files([p for p in (source / "train.json", source / "eval.json") if p.exists()], cached=False),
                  "tokenizer": sha256_files(tokenizer_files, cached=False)}
        parameters = {"model_max_length": max_length, "chat_template": chat_template}
        return publish(out, lambda folder: {"report": tokenize_files(source, model_dir, folder, chat_template, max_length,
                                                                     num_proc, log)},
                       stage="tokenize", inputs=inputs, parameters=parameters, log=log)


def model_folder(uri: str, settings: StoreSettings | None = None, log: Log = default_log) -> Path:
    """A model to load: a store output (s3:// or a folder with manifest.json, verified), or a plain
    transformers folder on disk. A store output without its manifest is incomplete and refused,
    and so is a folder without a model config or tokenizer."""
    path = Path(uri).expanduser()
    if uri.startswith("s3://") or (path / "manifest.json").is_file():
        folder = fetch_output(uri, settings, log=log)
    elif path.is_dir() and path.parent.name in ("weights", "delta", "train"):
        raise ManifestError(f"{uri}: no complete output here (manifest.json missing)")
    elif not path.is_dir():
        raise ManifestError(f"{uri}: no such folder")
    else:
        folder = path
    if not (folder / "config.json").is_file():
        raise ManifestError(f"{uri}: not a model (no config.json)")
    require_tokenizer(folder, uri)
    from labtune.models.tensorfiles import check_model_folder

    check_model_folder(folder)  # a cut weight file is named here, not by the loader's own error
    return folder


def token_limit(setting: str) -> int:
    """`--max-new-tokens` given as a number, checked (before any model loads)."""
    try:
        budget = int(setting)
    except ValueError:
        budget = 0
    if budget < 1:
        raise LabtuneError(f"--max-new-tokens: must be auto or a whole number of at least 1 (got {setting!r})")
    return budget


def answer_budget_for_model(folder: Path, setting: str, settings: StoreSettings | None = None,
                            log: Log = default_log) -> int:
    """`--max-new-tokens` as a number: a number as given; auto, for a train stage's output, by the
    evaluate stage's rule (its training data's longest answer, replay's general answers included, plus the
    margin), else the default."""
    from labtune.evaluation import generation

    if setting != "auto":
        return token_limit(setting)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = {}
    tokens = manifest.get("inputs", {}).get("tokens") if manifest.get("stage") == "train" else None
    if not tokens:
        return generation.DEFAULT_MAX_NEW_TOKENS
    from labtune.stages.evaluate import training_longest_answer

    # a person may ask anything: the replay conversations' general answers count here too
    return generation.auto_max_new_tokens(training_longest_answer(fetch_output(tokens, settings, log), replay=True))
