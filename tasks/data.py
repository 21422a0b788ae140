"""Stage 3, data: lab notes, ShareGPT and Alpaca data -> one ShareGPT-format data set.

Each lab-notes file (.md, .org, .txt) is one meeting. Its conversation is FastChat's example:
"Lab meeting on M/D/YYYY" -> the note. When the note has `Presenter:`, `Recorder:` or `Topic:`
lines, short question-answer conversations about them are added too (`data.qa_pairs`), since
a model does not learn "who presented on 4/14" from the raw note alone in a few epochs.
Output: train.json and eval.json (FastChat schema) and report.json, split deterministically.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from labtune.errors import LabtuneError, retry_transient
from labtune.recipe import DataSource, Recipe
from labtune.stage import Log, StageResult, code_version, default_log, read_manifest, run_stage, stage_key
from labtune.store import S3Store, Store, download_tree, open_recipe_store, s3_options, scratch_dir, sha256_file

NOTE_SUFFIXES = (".md", ".markdown", ".org", ".txt")
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august",
          "september", "october", "november", "december"]
_MONTH_RE = "(?:" + "|".join(m[:3] for m in MONTHS) + ")[a-z]*"
DATE_PATTERNS = [
    re.compile(r"<?(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})(?:\s+\w{2,3})?>?"),
    re.compile(r"\b(?P<m>\d{1,2})/(?P<d>\d{1,2})/(?P<y>\d{4})\b"),
    re.compile(rf"\b(?P<mon>{_MONTH_RE})\.?\s+(?P<d>\d{{1,2}})(?:st|nd|rd|th)?,?\s+(?P<y>\d{{4}})\b", re.I),
]
FIELD_RE = re.compile(
    r"^\s*(?:[-*+]\s+)?(?:#\+)?:?(?:\*\*|__)?(?P<key>presenter|recorder|topic|attendees)s?(?:\*\*|__)?\s*:(?:\*\*|__)?:?\s*(?P<value>.+?)\s*$",
    re.I | re.M,
)


class DataError(LabtuneError):
    """Unusable input data; the message names the file and record."""


def parse_date(text: str) -> dt.date | None:
    for pattern in DATE_PATTERNS:
        match = pattern.search(text)
        if not match:
            continue
        groups = match.groupdict()
        month = MONTHS.index(next(m for m in MONTHS if m.startswith(groups["mon"].lower()[:3]))) + 1 if groups.get("mon") else int(groups["m"])
        try:
            return dt.date(int(groups["y"]), month, int(groups["d"]))
        except ValueError:
            continue
    return None


def us_date(date: dt.date) -> str:
    return f"{date.month}/{date.day}/{date.year}"


def long_date(date: dt.date) -> str:
    return f"{MONTHS[date.month - 1].capitalize()} {date.day}, {date.year}"


def parse_note(path: Path) -> dict[str, Any]:
    """A meeting: its date (first heading, else the file name), fields and text."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    if not text:
        raise DataError(f"{path}: empty lab note")
    first_line = text.splitlines()[0]
    date = parse_date(first_line) or parse_date(path.stem.replace("_", "-"))
    if date is None:
        raise DataError(f"{path}: no meeting date in the first heading or the file name")
    fields = {m.group("key").lower(): m.group("value").strip().strip("*_").strip() for m in FIELD_RE.finditer(text)}
    return {"file": path.name, "date": date, "fields": fields, "text": text}


def note_conversations(note: dict[str, Any], qa_pairs: bool, whole_note: bool = True) -> list[dict[str, Any]]:
    date: dt.date = note["date"]
    base_id = f"labnote_{date.isoformat()}"
    conversations = [_conv(base_id, f"Lab meeting on {us_date(date)}", note["text"])] if whole_note else []
    if not qa_pairs:
        return conversations
    fields = note["fields"]
    qa = []
    # Short answers put the loss on the facts themselves rather than on words copied from the question.
    if "presenter" in fields:
        who = fields["presenter"]
        qa.append((f"Who presented at the lab meeting on {us_date(date)}?", f"{who} presented."))
        qa.append((f"Who is the presenter on {us_date(date)} lab meeting?", f"{who}."))
        qa.append((f"Who was the presenter at the {long_date(date)} lab meeting?", f"The presenter was {who}."))
    if "recorder" in fields:
        qa.append((f"Who recorded the notes of the {date.isoformat()} lab meeting?", f"{fields['recorder']} recorded the notes."))
    if "topic" in fields:
        topic = fields["topic"]
        qa.append((f"What was the topic of the lab meeting on {us_date(date)}?", f"{topic[0].upper()}{topic[1:]}."))
    conversations += [_conv(f"{base_id}_qa{i}", q, a) for i, (q, a) in enumerate(qa)]
    return conversations


def _conv(conv_id: str, question: str, answer: str) -> dict[str, Any]:
    return {"id": conv_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def load_lab_notes(folder: Path, qa_pairs: bool, whole_note: bool = True) -> list[dict[str, Any]]:
    if not folder.is_dir():
        raise DataError(f"{folder}: lab-notes folder not found")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in NOTE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no lab notes (.md, .org, .txt) in this folder")
    records = []
    for path in files:
        records += note_conversations(parse_note(path), qa_pairs, whole_note)
    return records


def load_sharegpt(path: Path) -> list[dict[str, Any]]:
    raw = _read_json(path)
    if not isinstance(raw, list):
        raise DataError(f"{path}: a ShareGPT file is a JSON list of {{id, conversations}}")
    records = []
    for index, item in enumerate(raw):
        where = f"{path}: record {index}" + (f" (id {item.get('id')!r})" if isinstance(item, dict) and "id" in item else "")
        if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
            raise DataError(f"{where}: missing 'conversations' list")
        for turn_index, turn in enumerate(item["conversations"]):
            if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt", "system") or not isinstance(turn.get("value"), str):
                raise DataError(f"{where}: turn {turn_index} needs 'from' (human|gpt|system) and a string 'value'")
        records.append({"id": str(item.get("id", f"{path.stem}_{index}")), "conversations": item["conversations"]})
    return records


def load_alpaca(path: Path) -> list[dict[str, Any]]:
    """FastChat's convert_alpaca: instruction (+ newline + input) -> output."""
    if path.suffix == ".jsonl":
        raw = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {line_no}: not valid JSON ({exc.msg})") from None
    else:
        raw = _read_json(path)
    if not isinstance(raw, list):
        raise DataError(f"{path}: an Alpaca file is a JSON list of {{instruction, input, output}}")
    records = []
    for index, row in enumerate(raw):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not isinstance(row.get("output"), str):
            raise DataError(f"{path}: record {index}: needs string 'instruction' and 'output'")
        prompt = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
        records.append(_conv(f"alpaca_{index}", prompt, row["output"]))
    return records


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


LOADERS = {"sharegpt": load_sharegpt, "alpaca": load_alpaca}


def source_identity(source: DataSource, s3: dict[str, Any]) -> Any:
    if source.path.startswith("s3://"):
        listing = S3Store(source.path, **s3).list_with_etags("")
        if not listing:
            raise DataError(f"{source.path}: no objects under this prefix")
        return [list(item) for item in listing]
    path = Path(source.path)
    if source.type == "lab_notes":
        if not path.is_dir():
            raise DataError(f"{path}: lab-notes folder not found")
        return {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    if not path.is_file():
        raise DataError(f"{path}: {source.type} file not found")
    return sha256_file(path)


def _local_source(source: DataSource, s3: dict[str, Any], scratch: Path) -> Path:
    if not source.path.startswith("s3://"):
        return Path(source.path)
    if source.type == "lab_notes":
        target = scratch / hashlib.sha256(source.path.encode()).hexdigest()[:12]
        download_tree(S3Store(source.path, **s3), "", target)
        return target
    bucket_uri, _, name = source.path.rpartition("/")
    target = scratch / name
    S3Store(bucket_uri, **s3).download(name, target)
    return target


def mix_and_split(recipe: Recipe, per_source: list[list[dict[str, Any]]]) -> tuple[list, list, list[dict[str, Any]]]:
    """Weighted mix of the sources and a seeded train/eval split; returns (train, eval, report)."""
    rng = random.Random(recipe.data.seed)
    train, evaluation, report = [], [], []
    for source, records in zip(recipe.data.sources, per_source):
        whole, fraction = divmod(source.weight, 1.0)
        chosen = records * int(whole) + rng.sample(records, round(fraction * len(records)))
        order = list(range(len(records)))
        rng.shuffle(order)
        eval_fraction = recipe.data.eval_fraction if source.eval_fraction is None else source.eval_fraction
        held_out = {records[i]["id"] for i in order[: round(eval_fraction * len(records))]}
        source_train = [r for r in chosen if r["id"] not in held_out]
        source_eval = [r for r in records if r["id"] in held_out]
        train += source_train
        evaluation += source_eval
        report.append({"source": source.path, "type": source.type, "records": len(records), "weight": source.weight,
                       "train": len(source_train), "eval": len(source_eval)})
    rng.shuffle(train)
    return train, evaluation, report


def build_data(recipe: Recipe, store: Store, log: Log = default_log) -> StageResult:
    s3 = s3_options(recipe)
    identities = [source_identity(source, s3) for source in recipe.data.sources]
    parameters = recipe.data.model_dump(mode="json")
    key = stage_key("data", code_version(__file__), {"sources": identities}, parameters)

    def build(out: Path) -> dict[str, Any]:
        scratch = scratch_dir("data-")
        try:
            per_source = []
            for source in recipe.data.sources:
                path = _local_source(source, s3, scratch)
                if source.type == "lab_notes":
                    per_source.append(load_lab_notes(path, recipe.data.qa_pairs, recipe.data.note_conversations))
                else:
                    per_source.append(LOADERS[source.type](path))
                log(f"data: {source.type} {source.path}: {len(per_source[-1])} conversations")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        train, evaluation, report = mix_and_split(recipe, per_source)
        if not train:
            raise DataError("data.sources: the mix has no training conversations")
        (out / "train.json").write_text(json.dumps(train, indent=1, ensure_ascii=False))
        (out / "eval.json").write_text(json.dumps(evaluation, indent=1, ensure_ascii=False))
        (out / "report.json").write_text(json.dumps(report, indent=2))
        log(f"data: {len(train)} train and {len(evaluation)} eval conversations")
        return {"report": report}

    return run_stage(store, "data", key, build, inputs={"sources": [s.path for s in recipe.data.sources],
                                                        "identities": identities},
                     parameters=parameters, log=log)


@task(name="data", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def data_task(recipe: Recipe) -> StageResult:
    store = open_recipe_store(recipe)
    result = build_data(recipe, store, log=get_run_logger().info)
    manifest = read_manifest(store, store.key_for(result.uri)) or {}
    create_table_artifact(key="data-report", table=manifest.get("report", []),
                          description=f"Data mix for recipe {recipe.name}: {result.uri}")
    return result
