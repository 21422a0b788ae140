"""Training conversations from every input a lab has, cleaned and counted.

Inputs: lab notes (see `labtune/data/notes.py`), ShareGPT JSON (FastChat's schema, loaded as is),
Alpaca JSON/JSONL (FastChat's `convert_alpaca`: instruction + newline + input -> output), and
OpenAI-style `messages` rows (a `datasets` folder saved with `save_to_disk`, Parquet, or JSONL).
Everything becomes ShareGPT records: {"id", "conversations": [{"from": human|gpt|system, "value"}]}.

Cleaning, with a count per reason: a leading non-human turn is removed; a conversation whose
roles do not alternate, or with an empty turn, or with no assistant turn, is dropped (or fails
the stage, by recipe) naming its id; a trailing unanswered question is trimmed; duplicates by id
(within a source) and by content (across sources) are dropped. Malformed files fail with the
file and line, records with a missing field with the record index and the field.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labtune.data.augment import PLAIN_FACTS, facts_asked, pack_turns, training_conversations
from labtune.data import heldout
from labtune.data.fresh import fresh_dates, fresh_prompts
from labtune.data.raft import with_notes
from labtune.data.note_dates import date_in_name
from labtune.data.note_fields import QA_FIELDS, joined_fields
from labtune.data.notes import (
    NO_DATE,
    Note,
    NoteError,
    note_conversation,
    note_files,
    read_meetings,
    resolve_lab_names,
    unread_files,
)
from labtune.data.statement_questions import statement_prompts, statement_records
from labtune.errors import LabtuneError

if TYPE_CHECKING:
    from labtune.recipe import AugmentConfig, DataConfig

ROLE = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "chatgpt": "gpt", "bard": "gpt",
        "bing": "gpt", "model": "gpt", "system": "system"}
MAX_LISTED = 50  # dropped records listed by id in a report, per source
# the ids of the replay stage's records: tokenize and the worker tell them from the notes' by it
REPLAY_PREFIX = "replay_"


class DataError(LabtuneError):
    """Unusable input data; the message names the file and record (and field or line)."""


@dataclass
class SourceReport:
    """What happened to one source's records; goes into the data report artifact."""

    source: str
    type: str
    files: int = 0
    records: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    fixed: dict[str, int] = field(default_factory=dict)
    skipped_files: list[str] = field(default_factory=list)
    dropped_ids: list[str] = field(default_factory=list)
    weight: float = 1.0
    train: int = 0
    eval: int = 0
    # lab notes: one entry per note read ({file, date, read_from, facts, flags})
    notes: list[dict[str, Any]] = field(default_factory=list)
    # lab notes with data.augment: evaluation prompts in held-out forms (not part of the report)
    prompts: list[dict[str, Any]] = field(default_factory=list)
    # with data.augment.dev_questions: early stopping's questions (not part of the report)
    dev: list[dict[str, Any]] = field(default_factory=list)
    # lab notes: every fact read, with its file and line (facts.json; not part of the report)
    read_facts: list[dict[str, Any]] = field(default_factory=list)

    def drop(self, record_id: str, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if len(self.dropped_ids) < MAX_LISTED:
            self.dropped_ids.append(f"{record_id}: {reason}")

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("prompts", "read_facts", "dev")}


# --- loaders ----------------------------------------------------------------------------------

def read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def read_jsonl(path: Path) -> list[Any]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {line_no}: not valid JSON ({exc.msg})") from None
    return rows


def _json_rows(path: Path) -> list[Any]:
    return read_jsonl(path) if path.suffix == ".jsonl" else read_json(path)


def load_sharegpt(path: Path) -> list[dict[str, Any]]:
    """FastChat's ShareGPT file, unchanged: a JSON list of {id, conversations: [{from, value}]}."""
    raw = _json_rows(path)
    if not isinstance(raw, list):
        raise DataError(f"{path}: a ShareGPT file is a JSON list of {{id, conversations}}")
    records = []
    for index, item in enumerate(raw):
        where = f"{path}: record {index}" + (f" (id {item.get('id')!r})" if isinstance(item, dict) and "id" in item else "")
        if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
            raise DataError(f"{where}: missing field 'conversations' (a list of turns)")
        for turn_index, turn in enumerate(item["conversations"]):
            if not isinstance(turn, dict):
                raise DataError(f"{where}: turn {turn_index} is not an object")
            for name in ("from", "value"):
                if not isinstance(turn.get(name), str):
                    raise DataError(f"{where}: turn {turn_index}: missing field '{name}' (a string)")
        records.append({"id": str(item.get("id", f"{path.stem}_{index}")), "conversations": item["conversations"]})
    return records


def load_alpaca(path: Path) -> list[dict[str, Any]]:
    """FastChat's convert_alpaca: instruction (+ newline + input) -> output."""
    raw = _json_rows(path)
    if not isinstance(raw, list):
        raise DataError(f"{path}: an Alpaca file is a JSON list of {{instruction, input, output}}")
    records = []
    for index, row in enumerate(raw):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {index}: not an object")
        for name in ("instruction", "output"):
            if name not in row or row[name] is None:
                raise DataError(f"{path}: record {index}: missing field '{name}' (a string)")
            if not isinstance(row[name], str):
                raise DataError(f"{path}: record {index}: field '{name}' must be a string, "
                                f"not {type(row[name]).__name__} ({row[name]!r:.40})")
        if row.get("input") is not None and not isinstance(row["input"], str):
            raise DataError(f"{path}: record {index}: field 'input' must be a string")
        prompt = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
        records.append({"id": f"alpaca_{index}", "conversations": [{"from": "human", "value": prompt},
                                                                    {"from": "gpt", "value": row["output"]}]})
    return records


def _message_rows(path: Path) -> Iterable[dict[str, Any]]:
    if path.is_dir():
        from datasets import Dataset, DatasetDict, load_from_disk

        try:
            loaded = load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"{path}: not a dataset saved with save_to_disk ({type(exc).__name__})") from None
        if isinstance(loaded, DatasetDict):
            if "train" not in loaded and len(loaded) != 1:
                raise DataError(f"{path}: dataset has splits {sorted(loaded)} and none is 'train'")
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        assert isinstance(loaded, Dataset)
        return iter(loaded)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return iter(pq.read_table(path).to_pylist())
        except Exception as exc:
            raise DataError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from None
    rows = _json_rows(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list (or JSONL) of {{messages: [{{role, content}}]}}")
    return iter(rows)


def load_messages(path: Path) -> list[dict[str, Any]]:
    """OpenAI-style rows ({messages: [{role, content}], id?}) -> ShareGPT records."""
    if not path.exists():
        raise DataError(f"{path}: file or folder not found")
    records = []
    for index, row in enumerate(_message_rows(path)):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list):
            raise DataError(f"{path}: record {index}: missing field 'messages' (a list of {{role, content}})")
        turns = []
        for turn_index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise DataError(f"{path}: record {index}: message {turn_index}: needs string fields 'role' and 'content'")
            turns.append({"from": message["role"], "value": message["content"]})
        record_id = row.get("id") if isinstance(row.get("id"), (str, int)) else f"{path.stem}_{index}"
        records.append({"id": str(record_id), "conversations": turns})
    return records


def load_lab_notes(folder: Path, report: SourceReport, *, qa: bool = True, whole_note: bool = True,
                   qa_fields: tuple[str, ...] = QA_FIELDS, undated: str = "skip", augment: AugmentConfig | None = None,
                   seed: int = 42, log=print, date_order: str = "MDY",
                   field_names: dict[str, list[str]] | None = None, fresh_meetings: int = 0) -> list[dict[str, Any]]:
    """Every note of a folder as conversations; every file not read is named in the report. Notes
    without a date are skipped (or fail, `undated="fail"`); meetings sharing a date are all kept. With
    `augment` (data.augment, enabled), the question-answer pairs are labtune/data/augment.py's facts in
    many forms (action items among them when qa_fields has them), the held-out prompts in report.prompts.
    report.notes says, per note, what was read; report.read_facts holds every fact and its line. The
    `fresh_meetings` latest meetings are read and reported but kept out of training (labtune.data.fresh)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: lab-notes folder not found")
    files, (documents, others) = note_files(folder), unread_files(folder)
    if not files:
        raise no_notes(folder, documents)
    report_unread(folder, documents, others, report, log)
    records: list[dict[str, Any]] = []
    read: list[tuple[str, Any]] = []
    seen: collections.Counter[str] = collections.Counter()
    many = augment is not None and augment.enabled
    for path in files:
        relative = path.relative_to(folder).as_posix()
        if path.stat().st_size > 4_000_000:  # seconds of reading: said before, not after
            log(f"data: reading {relative} ({path.stat().st_size / 1e6:.1f} MB)")
        try:
            meetings = read_meetings(path, date_order, field_names)
        except NoteError as exc:
            undated_note = NO_DATE in str(exc)
            if undated_note and undated == "fail":
                raise DataError(str(exc)) from None
            report.skipped_files.append(f"{relative}: {str(exc).split(': ', 1)[1]}")
            log(f"data: skipped {exc}")
            documents.append((path, str(exc)))  # a file not read still names its meeting (unread_meetings)
            continue
        report.files += 1
        read += [(relative, note) for note in meetings]  # a running log holds several
    read = merge_schedules(read)
    notes = resolve_lab_names([note for _, note in read])
    notes += unread_meetings(folder, documents, {n.date for n in notes}, date_order)
    kept_out = fresh_dates(notes, fresh_meetings)
    for relative, note in read:
        note_id = f"labnote_{note.date.isoformat()}"
        seen[note_id] += 1
        if seen[note_id] > 1:
            note_id += f"_{seen[note_id]}"
        if note.date not in kept_out and whole_note:
            records.append(note_conversation(note, note_id))
        report.notes.append(note_summary(note, relative, date_order))
        report.read_facts += [{"file": f.source or relative, "line": f.line, "date": note.date.isoformat(), "field": f.field,
                               "value": f.value, "how": f.how, **({"owner": f.owner} if f.owner else {}),
                               **({"due": f.due} if f.due else {}), **({"kind": f.kind} if f.kind else {})}
                              for f in note.facts]
    if qa and notes:
        records += (taught_facts(notes, records, report, augment, qa_fields, seed, kept_out) if many
                    else plain_facts(folder, notes, augment, qa_fields, seed, kept_out))
    return records


def plain_facts(folder: Path, notes: list[Note], augment: AugmentConfig | None, qa_fields: tuple[str, ...], seed: int,
                kept_out: set[Any]) -> list[dict[str, Any]]:
    """With data.augment off: PLAIN_FACTS's questions about the meetings not kept out."""
    if augment is None:
        raise DataError(f"{folder}: question-answer pairs need data.augment's settings")
    taught = [n for n in notes if n.date not in kept_out]
    return training_conversations(taught, augment.model_copy(update=PLAIN_FACTS), seed, plain=True, **facts_asked(qa_fields))


def taught_facts(notes: list[Note], records: list[dict[str, Any]], report: SourceReport, augment: AugmentConfig,
                 qa_fields: tuple[str, ...], seed: int, kept_out: set[Any] = frozenset()) -> list[dict[str, Any]]:
    """data.augment's training questions about the notes' facts and statements, a share of them with
    notes in the prompt (labtune.data.raft); their held-out prompts in report.prompts (and early
    stopping's in report.dev); the meetings `kept_out` of training asked as `fresh` ones."""
    fresh = [n for n in notes if n.date in kept_out]
    notes = [n for n in notes if n.date not in kept_out]
    extra = facts_asked(qa_fields)
    actions = extra.pop("actions")
    facts = training_conversations(notes, augment, seed, actions, **extra)
    if augment.statement_questions:
        facts += statement_records(notes, augment, seed, qa_fields)
    packed = pack_turns(facts, augment.facts_per_conversation, seed)
    # whole notes are training text the templates do not control: what they say is not asked as held out
    seen = "\n".join(turn["value"] for record in records + packed if not record.get("fact")
                     for turn in record["conversations"])
    report.prompts = heldout.eval_prompts(notes, augment, seed, facts, actions, seen, **extra)
    if augment.statement_questions:  # last: the other axes' prompts stay as they were
        report.prompts += statement_prompts(notes, augment, seed, qa_fields, seen)
    if fresh:  # no no-meeting question may ask a fresh meeting's date
        asked = {n.date.isoformat() for n in fresh}
        report.prompts = [p for p in report.prompts if not (p["tags"][0].startswith("absent") and p["id"][-10:] in asked)]
        report.prompts += fresh_prompts(notes + fresh, fresh, augment, seed, extra["fields"], qa_fields)
    if augment.dev_questions:
        report.dev = heldout.dev_conversations(notes, augment, seed, report.prompts, actions, seen, fields=extra["fields"])
    return with_notes(packed, notes, augment, seed)


def merge_schedules(read: list[tuple[str, Note]]) -> list[tuple[str, Note]]:
    """A schedule's row joins the note of its date: the fields the note leaves empty come from the
    row (each fact naming the schedule as its source); a field both give differently keeps the
    note's values (what was written after the meeting) and is named among the note's flags. A row
    with no note of its date is a meeting of its own."""
    notes_by_date: dict[Any, Note] = {}
    for _, note in read:
        if not note.schedule:
            notes_by_date.setdefault(note.date, note)
    merged = []
    for relative, note in read:
        target = notes_by_date.get(note.date) if note.schedule else None
        if target is None:
            merged.append((relative, note))
            continue
        for name in dict.fromkeys(f.field for f in note.facts):
            values, theirs = note.values(name), target.values(name)
            if not theirs:
                target.facts += [dataclasses.replace(f, source=relative) for f in note.facts if f.field == name]
            elif {v.lower() for v in values} != {v.lower() for v in theirs} and name in ("presenter", "recorder", "topic"):
                target.rejected.append(f"{name}: {relative} line {note.lines[0] if note.lines else 1} says "
                                       f"{', '.join(values)}; the note says {', '.join(theirs)} (the note's kept)")
        target.rejected += [f"{relative} {flag}" for flag in note.rejected]  # "talks.tsv line 4: no date ..."
        target.fields = joined_fields(target.facts)
    return merged


def no_notes(folder: Path, documents: list[tuple[Path, str]]) -> DataError:
    unread = f"; not read: {', '.join(p.relative_to(folder).as_posix() for p, _ in documents[:5])}" if documents else ""
    return DataError(f"{folder}: no lab notes (.md, .org, .txt, .eml) in this folder{unread}")


def report_unread(folder: Path, documents: list[tuple[Path, str]], others: list[Path], report: SourceReport,
                  log=print) -> None:
    """Each document not read, with its reason, and one line counting the files that are not notes."""
    for path, reason in documents:
        report.skipped_files.append(f"{path.relative_to(folder).as_posix()}: {reason}")
        log(f"data: skipped {path}: {reason}")
    if others:
        names = ", ".join(p.relative_to(folder).as_posix() for p in others[:5]) + (", ..." if len(others) > 5 else "")
        report.skipped_files.append(f"{len(others)} files are not notes (images, binaries): {names}")


def unread_meetings(folder: Path, documents: list[tuple[Path, Any]], known: set[Any], date_order: str) -> list[Note]:
    """A meeting for each date that only the name of a file labtune does not read gives: no facts
    are taught of it, but no-meeting dates are never drawn on it and it is among its month's
    meetings (labtune.data.augment)."""
    dated = {}
    for path, _ in documents:
        found = date_in_name(path.stem, date_order)
        if found and found.date not in known:
            dated.setdefault(found.date, path.relative_to(folder).as_posix())
    return [Note(name, date, "", date_source="the file name", unread=True) for date, name in sorted(dated.items())]


def note_summary(note: Note, relative: str, date_order: str) -> dict[str, Any]:
    """One note in the data report: its date, where it was read, its facts per field, and flags."""
    counts = collections.Counter(f.field for f in note.facts)
    flags = list(note.rejected)
    if note.other_date:
        other = "DMY" if date_order == "MDY" else "MDY"
        flags.append(f"date {note.date.isoformat()} read as {date_order}; as {other} it would be {note.other_date.isoformat()}"
                     " (set data.date_order)")
    if not any(f.field != "statement" for f in note.facts):
        flags.append("no facts read" if not note.facts else "no fields read: only its sentences, as statements")
    where = f"{relative}:{note.lines[0]}-{note.lines[1]}" if note.lines else relative
    return {"file": where, "date": note.date.isoformat(), "read_from": note.date_source, "facts": dict(counts),
            "flags": flags}


# --- cleaning ---------------------------------------------------------------------------------

def clean(records: list[dict[str, Any]], report: SourceReport, where: str, on_invalid: str = "drop",
          seen_content: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """FastChat-style cleaning with a count per reason (see the module docstring)."""
    kept: list[dict[str, Any]] = []
    seen_ids: set[str] = set()
    seen_content = {} if seen_content is None else seen_content
    for index, record in enumerate(records):
        record_id = record["id"]
        problem, turns = _normalise(record["conversations"], report)
        if problem:
            if on_invalid == "fail":
                raise DataError(f"{where}: record {index} (id {record_id!r}): {problem}")
            report.drop(record_id, problem.split(" at turn")[0])
            continue
        if record_id in seen_ids:
            report.drop(record_id, "duplicate id")
            continue
        digest = hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode()).hexdigest()
        if digest in seen_content:
            report.drop(record_id, "duplicate content")
            continue
        seen_ids.add(record_id)
        seen_content[digest] = record_id
        kept.append({"id": record_id, "conversations": turns, **{k: record[k] for k in ("fact", "facts") if k in record}})
    report.kept = len(kept)
    return kept


def _normalise(turns: list[dict[str, str]], report: SourceReport) -> tuple[str | None, list[dict[str, str]]]:
    """(problem or None, cleaned turns)."""
    out: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        role = ROLE.get(turn["from"].lower())
        if role is None:
            return f"unknown role {turn['from']!r} at turn {i}", []
        out.append({"from": role, "value": turn["value"]})
    system = out[:1] if out and out[0]["from"] == "system" else []
    body = out[len(system):]
    if body and body[0]["from"] != "human":
        body = body[1:]
        report.fixed["leading non-human turn removed"] = report.fixed.get("leading non-human turn removed", 0) + 1
    for i, turn in enumerate(body):
        if not turn["value"].strip():
            return f"empty turn at turn {i + len(system)}", []
        if turn["from"] != ("human" if i % 2 == 0 else "gpt"):
            return f"roles do not alternate at turn {i + len(system)}", []
    if body and body[-1]["from"] == "human":
        body = body[:-1]
        report.fixed["trailing question trimmed"] = report.fixed.get("trailing question trimmed", 0) + 1
    if not body:
        return "no assistant turn", []
    return None, system + body


# --- mixing -----------------------------------------------------------------------------------

def mix_and_split(per_source: list[list[dict[str, Any]]], reports: list[SourceReport], weights: list[float],
                  eval_fractions: list[float], seed: int) -> tuple[list, list]:
    """Weighted mix of the sources and a seeded train/eval split. Held-out records never enter
    training, whatever the weight; a weight of 2.0 takes every training record twice."""
    rng = random.Random(seed)
    train, evaluation = [], []
    for records, report, weight, eval_fraction in zip(per_source, reports, weights, eval_fractions):
        order = list(range(len(records)))
        rng.shuffle(order)
        held_out = {records[i]["id"] for i in order[: round(eval_fraction * len(records))]}
        pool = [r for r in records if r["id"] not in held_out]
        whole, fraction = divmod(weight, 1.0)
        chosen = pool * int(whole) + rng.sample(pool, round(fraction * len(pool)))
        train += chosen
        evaluation += [r for r in records if r["id"] in held_out]
        report.weight, report.train, report.eval = weight, len(chosen), len(held_out)
    rng.shuffle(train)
    return train, evaluation


LOADERS = {"sharegpt": load_sharegpt, "alpaca": load_alpaca, "messages": load_messages}


def convert(config: DataConfig, paths: list[Path], log=print, fresh_meetings: int = 0
            ) -> tuple[list, list, list[SourceReport]]:
    """Load, clean, mix and split every source of a DataConfig (paths are local copies of
    config.sources); returns (train, eval, one report per source). `fresh_meetings`
    (evaluation.fresh_meetings): the latest meetings of each notes folder kept out of training."""
    per_source, reports = [], []
    seen_content: dict[str, str] = {}
    for source, path in zip(config.sources, paths):
        report = SourceReport(source.path, source.type)
        if source.type == "lab_notes":
            records = load_lab_notes(path, report, qa=config.qa_pairs, whole_note=config.note_conversations,
                                     qa_fields=tuple(config.qa_fields), undated=config.undated_notes,
                                     augment=config.augment, seed=config.seed, log=log,
                                     date_order=config.date_order, field_names=config.field_names,
                                     fresh_meetings=fresh_meetings)
        else:
            records = LOADERS[source.type](path)
        report.records = len(records)
        kept = clean(records, report, str(path), config.invalid_conversations, seen_content)
        dropped = ", ".join(f"{n} {reason}" for reason, n in report.dropped.items())
        log(f"data: {source.type} {source.path}: {len(records)} conversations, {len(kept)} kept"
            + (f" (dropped: {dropped})" if dropped else ""))
        per_source.append(kept)
        reports.append(report)
    fractions = [config.eval_fraction if s.eval_fraction is None else s.eval_fraction for s in config.sources]
    train, evaluation = mix_and_split(per_source, reports, [s.weight for s in config.sources], fractions, config.seed)
    if not train:
        raise DataError("data.sources: the mix has no training conversations")
    return train, evaluation, reports
