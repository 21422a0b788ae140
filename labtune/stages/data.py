"""Stage 3, data: lab notes, ShareGPT, Alpaca and `messages` data -> one ShareGPT data set.

The conversion itself is `labtune/data/conversations.py` (loading, cleaning with counts, weighted
mix, seeded split) and `labtune/data/notes.py` (lab notes -> conversations). This stage fetches the
sources (local or `s3://`), runs it, and writes train.json, eval.json and report.json; the
report becomes the `data-report` artifact (records per source, kept, dropped with reasons).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from labtune.data import (
    augment,
    conversations,
    fresh,
    heldout,
    note_dates,
    note_email,
    note_fields,
    note_prose,
    note_sections,
    notes,
    raft,
    statement_questions,
    statements,
    wordings,
    words,
)
from labtune.data.conversations import DataError, convert
from labtune.data.note_fields import SHORT_FIELDS
from labtune.data.notes import meeting_documents
from labtune.recipe import DataSource, Recipe
from labtune.store.backends import Store, StoreSettings, download_tree, open_store, scratch_dir
from labtune.store.hashing import sha256_file
from labtune.store.outputs import Log, StageKey, StageResult, code_version, default_log, output_prefix, run_stage, stage_key

__all__ = ["DataError", "build_data", "data_identity", "report_markdown"]


def data_identity(source: DataSource, settings: StoreSettings) -> Any:
    if source.path.startswith("s3://"):
        listing = open_store(settings.at(source.path)).list_with_etags("")
        if not listing:
            raise DataError(f"{source.path}: no objects under this prefix")
        return [list(item) for item in listing]
    path = Path(source.path)
    if path.is_dir():
        files = notes.note_files(path) if source.type == "lab_notes" else sorted(p for p in path.rglob("*") if p.is_file())
        return {p.relative_to(path).as_posix(): sha256_file(p) for p in files}
    if source.type == "lab_notes":
        raise DataError(f"{path}: lab-notes folder not found")
    if not path.is_file():
        raise DataError(f"{path}: {source.type} file not found")
    return sha256_file(path)


def _local_source(source: DataSource, settings: StoreSettings, scratch: Path) -> Path:
    """A local copy of an s3:// source: a folder (lab notes, a saved dataset) or one file."""
    if not source.path.startswith("s3://"):
        return Path(source.path)
    if not source.path.endswith((".json", ".jsonl", ".parquet")):
        target = scratch / hashlib.sha256(source.path.encode()).hexdigest()[:12]
        download_tree(open_store(settings.at(source.path)), "", target)
        return target
    bucket_uri, _, name = source.path.rpartition("/")
    target = scratch / name
    open_store(settings.at(bucket_uri)).download(name, target)
    return target


def report_markdown(reports: list[dict[str, Any]], uri: str, facts: list[dict[str, Any]] | None = None) -> str:
    lines = ["| source | type | records | kept | dropped | fixed | train | eval |", "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        dropped = ", ".join(f"{n} {k}" for k, n in r["dropped"].items()) or "0"
        fixed = ", ".join(f"{n} {k}" for k, n in r["fixed"].items()) or "-"
        lines.append(f"| {r['source']} | {r['type']} | {r['records']} | {r['kept']} | {dropped} | {fixed} | "
                     f"{r['train']} | {r['eval']} |")
    skipped = [f"- `{r['source']}`: {f}" for r in reports for f in r["skipped_files"]]
    if skipped:
        lines += ["", "**Files skipped**", *skipped]
    read = [(r["source"], n) for r in reports for n in r.get("notes", [])]
    if read:
        flagged = [(s, n) for s, n in read if n["flags"]]
        lines += ["", f"**Notes read**: {notes_line(reports)}", "",
                  "| note | date | read from | presenter | recorder | topic | attendees | action items | decisions | statements | flags |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {n['file']} | {n['date']} | {n['read_from']} | "
                  + " | ".join(str(n["facts"].get(f, 0)) for f in ("presenter", "recorder", "topic", "attendees", "action_items",
                                                                 "decisions", "statement"))
                  + f" | {'; '.join(n['flags']) or ''} |" for _, n in read]
        if flagged:
            lines += ["", "**Notes to look at**", *[f"- `{n['file']}`: {'; '.join(n['flags'])}" for _, n in flagged]]
    listed = [f"- {item}" for r in reports for item in r["dropped_ids"]]
    if listed:
        lines += ["", "**Dropped records** (first 50 per source)", *listed]
    if facts:
        lines += ["", "**Training examples per lab-note fact**", "", "| meeting | field | value | examples |",
                  "|---|---|---|---|"]
        lines += [f"| {f['date']} | {f['field']} | {f['value'] or ('no meeting' if f['kind'] == 'absent' else 'not in the note')}"
                  f" | {f['examples']} |" for f in facts]
    return "\n".join(lines + ["", f"Output: `{uri}`"])


def notes_line(reports: list[dict[str, Any]]) -> str:
    """"N notes read, K skipped, M with no fields" over the lab-notes sources of a data report;
    "N notes read (P meetings), ..." when a file holds several meetings (a running log)."""
    notes = [n for r in reports for n in r.get("notes", [])]
    files = sum(r["files"] for r in reports if r["type"] == "lab_notes")
    skipped = sum(len(r["skipped_files"]) for r in reports if r["type"] == "lab_notes")
    empty = sum(1 for n in notes if any(flag.startswith(("no facts read", "no fields read")) for flag in n["flags"]))
    meetings = f" ({len(notes)} meetings)" if len(notes) != files else ""
    return f"{files} notes read{meetings}, {skipped} skipped, {empty} with no fields"


def read_facts_with_counts(reports: list[Any], counts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """facts.json: every fact read from the notes (file, line, date, field, value, how), with the
    number of training examples that carry it (0 when the recipe does not train that field)."""
    examples = {(c["date"], c["field"]): c["examples"] for c in counts}
    trained = {"action_items": ("action", "deadline"), "attendees": ("attendance",), "decisions": ("decision",)}
    return [{**fact, "examples": sum(examples.get((fact["date"], f), 0) for f in trained.get(fact["field"], (fact["field"],)))}
            for r in reports for fact in r.read_facts]




def heldout_prompts(evaluation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluation prompts from the held-out lab-note question-answer conversations: the question,
    the fact the answer must contain (either meeting's, when two share a date), tags
    `heldout_notes` and the field."""
    return [{"id": r["id"], "question": r["conversations"][0]["value"], "expected": r["fact"]["value"].split(" | "),
             "tags": ["heldout_notes", r["fact"]["field"]]}
            for r in evaluation if r.get("fact", {}).get("field") in SHORT_FIELDS and r["fact"]["value"]
            and r["fact"].get("kind", "recall") == "recall"]


def data_key(recipe: Recipe, store: Store) -> StageKey:
    """Keyed by the sources' identities (their files' hashes or ETags) and the data settings."""
    identities = [data_identity(source, recipe.store.settings()) for source in recipe.data.sources]
    parameters = recipe.data.model_dump(mode="json", exclude={"chat_template", "num_proc", "model_max_length"})
    if recipe.evaluation.fresh_meetings:  # kept out of training: other training data
        parameters["fresh_meetings"] = recipe.evaluation.fresh_meetings
    key = stage_key("data", code_version(__name__, conversations, notes, augment, heldout, wordings, words,
                                         note_dates, note_email, note_prose, note_fields, note_sections, statements,
                                         statement_questions, fresh, raft), {"sources": identities},
                    parameters)
    return StageKey(key, {"sources": [s.path for s in recipe.data.sources], "identities": identities}, parameters)


def build_data(recipe: Recipe, store: Store, log: Log = default_log) -> StageResult:
    settings = recipe.store.settings()
    key = data_key(recipe, store)

    def build(out: Path) -> dict[str, Any]:
        scratch = scratch_dir("data-")
        try:
            paths = [_local_source(source, settings, scratch) for source in recipe.data.sources]
            train, evaluation, reports = convert(recipe.data, paths, log, recipe.evaluation.fresh_meetings)
            # the notes themselves, for the evaluation's retrieval baseline
            documents = [d for source, path in zip(recipe.data.sources, paths) if source.type == "lab_notes"
                         for d in meeting_documents(path, recipe.data.date_order, recipe.data.field_names)]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        report = [r.as_dict() for r in reports]
        prompts = heldout_prompts(evaluation) + [p for r in reports for p in r.prompts]
        facts = augment.fact_counts(train)
        read = read_facts_with_counts(reports, facts)
        dev = [record for r in reports for record in r.dev]
        if recipe.data.system_prompt is not None:
            for record in train + evaluation + dev:
                first = record["conversations"][0]
                if (record.get("fact") or {}).get("notes"):  # a RAFT question: the system prompt, then its notes
                    first["value"] = raft.notes_system(recipe.data.system_prompt, first["value"])
                elif first["from"] != "system":
                    record["conversations"].insert(0, {"from": "system", "value": recipe.data.system_prompt})
        for record in train + evaluation:
            record.pop("fact", None)
            record.pop("facts", None)
        (out / "eval_prompts.json").write_text(json.dumps(prompts, indent=1, ensure_ascii=False))
        (out / "train.json").write_text(json.dumps(train, indent=1, ensure_ascii=False))
        (out / "eval.json").write_text(json.dumps(evaluation, indent=1, ensure_ascii=False))
        if dev:  # early stopping's questions (train.eval_strategy), tokenized beside train and eval
            (out / "dev.json").write_text(json.dumps(dev, indent=1, ensure_ascii=False))
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "notes.json").write_text(json.dumps(documents, indent=1, ensure_ascii=False))
        (out / "facts.json").write_text(json.dumps(read, indent=1, ensure_ascii=False))
        (out / "report.md").write_text(report_markdown(report, store.uri_for(output_prefix("data", key.key)), facts))
        if any(r.type == "lab_notes" for r in reports):
            log(f"data: {notes_line(report)} (see report.md)")
        log(f"data: {len(train)} train and {len(evaluation)} eval conversations"
            + (f"; {len(facts)} lab-note facts, {min(f['examples'] for f in facts)}-{max(f['examples'] for f in facts)} "
               f"training examples each; {len(prompts)} evaluation prompts" if facts else ""))
        return {"report": report, "facts": facts}

    return run_stage(store, "data", key.key, build, inputs=key.inputs, parameters=key.parameters, log=log)
