"""Lab-meeting notes -> training conversations.

One file is one meeting, or several: .md, .org, .txt; minutes sent by e-mail (.eml, or an .mbox
of them: labtune.data.note_email); a .docx, .odt, .pdf, .pptx or .html document, converted to
Markdown (labtune.data.note_documents); a schedule, a meeting per row (.csv, .tsv, .xlsx or a
Markdown table: labtune.data.note_schedule). Files it does not read are named (unread_files).
Its date comes from a Date:/When: field, the first
heading, the first lines or the file name, in any form people write (labtune.data.note_dates). Fields
(presenter, recorder, topic, attendees, action items) are read under the names labs give them
(FIELD_WORDS: speaker, scribe, minutes, subject, todo ..., and a recipe's own words) in every line
shape: "Key: value", "Key - value", "**Key**: value", a heading or "Key:" over a list, Markdown
table rows, Org drawers. Several presenters are several facts. Sentences that state a role ("Keiko
walked us through X", "Mateo took the notes") and action items (owner, task, due date) are read
by labtune.data.note_prose. Every fact keeps its line.

Each note becomes FastChat's example conversation ("Lab meeting on 5/12/2023" -> the note) and,
from its fields, short question-answer conversations in several phrasings: a small model does
not learn "who presented on 4/14" from the raw note in a few epochs, but it does from these.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from labtune.data.note_dates import FoundDate, date_in_name, find_dates, first_date, impossible_date
from labtune.data.note_documents import CONVERTED_SUFFIXES, document_text
from labtune.data.note_email import EmailNote, read_email
from labtune.data.note_schedule import SCHEDULE_SUFFIXES, markdown_schedule, schedule_rows
from labtune.data.note_fields import (
    FIELD_WORDS,
    HEADING,
    NoteFact,
    canonical_key,
    field_vocabulary,
    joined_fields,
    line_patterns,
    parse_fields,
    read_fields,
    unique_facts,
)
from labtune.data.note_prose import (
    action_facts,
    agenda_facts,
    decision_facts,
    prose_facts,
    resolve,
    resolve_names,
    subject_topic,
)
from labtune.data.note_sections import meeting_sections
from labtune.data.statements import statement_facts
from labtune.errors import LabtuneError

__all__ = ["FIELD_WORDS", "NoteFact", "parse_fields"]

NOTE_SUFFIXES = (".md", ".markdown", ".org", ".txt", ".eml", ".mbox", *CONVERTED_SUFFIXES, *SCHEDULE_SUFFIXES)
# files labs keep notes in that labtune does not read yet: named in the data report, never passed over
DOCUMENT_SUFFIXES = (".doc", ".rtf", ".ppt", ".odp", ".key", ".pages", ".xls", ".ods", ".numbers", ".msg",
                     ".rst", ".tex")
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august",
          "september", "october", "november", "december"]
DATE_LINES = 5  # a note's date is looked for in its first heading, then in its first lines
NO_DATE = f"no date in the heading, the first {DATE_LINES} lines, a Date: field or the file name"


class NoteError(ValueError):
    """A note cannot be used; the message names the file."""


@dataclass
class Note:
    file: str
    date: dt.date
    text: str
    fields: dict[str, str] = field(default_factory=dict)  # each field's values, joined, for display and retrieval
    facts: list[NoteFact] = field(default_factory=list)
    date_source: str = ""  # where the date was read ("the first heading", "line 3", "a Date: field", "the file name")
    other_date: dt.date | None = None  # the date under the other day/month order, when it reads differently
    rejected: list[str] = field(default_factory=list)  # field lines whose value is not what the field holds
    lines: tuple[int, int] | None = None  # first and last line in its file, for a file that holds several meetings
    # a meeting known only from the name of a file labtune could not read: never a no-meeting date,
    # no facts taught (labtune.data.augment skips it)
    unread: bool = False
    schedule: bool = False  # a schedule's row: merged into the note of its date (labtune.data.conversations)

    def values(self, name: str) -> list[str]:
        """Every value of a field, in the order the note gives them (two presenters: two values)."""
        return [f.value for f in self.facts if f.field == name]

    @property
    def actions(self) -> list[NoteFact]:
        return [f for f in self.facts if f.field == "action_items"]


def date_fields(text: str, words: dict[str, tuple[str, ...]], order: str) -> list[tuple[FoundDate, int]]:
    """Every Date:/When: field line's date and its line number."""
    field_line, table_row, canonical = line_patterns(words)
    found_lines = []
    for number, line in enumerate(text.splitlines(), 1):
        match = table_row.match(line) or field_line.match(line)
        if match and canonical_key(match.group("key"), canonical) == "date" and match.group("value"):
            found = first_date(match.group("value"), order)
            if found:
                found_lines.append((found, number))
    return found_lines


def _date_field(text: str, words: dict[str, tuple[str, ...]], order: str) -> tuple[FoundDate, int] | None:
    found = date_fields(text, words, order)
    return found[0] if found else None


def note_date(text: str, stem: str, words: dict[str, tuple[str, ...]], order: str = "MDY") -> tuple[FoundDate, str] | None:
    """The meeting's date and where it was read: a Date:/When: field, the first heading, the
    first DATE_LINES lines, the file name, in that order."""
    dated = _date_field(text, words, order)
    if dated:
        return dated[0], f"a {text.splitlines()[dated[1] - 1].strip().split(':')[0].strip('*-#: ')}: field"
    lines = [line for line in text.splitlines() if line.strip()]
    heading = next((line for line in lines[:DATE_LINES * 2] if HEADING.match(line)), None)
    if heading:
        found = first_date(heading, order)
        if found:
            return found, "the first heading"
    for number, line in enumerate(text.splitlines()[:DATE_LINES], 1):
        found = first_date(line, order)
        if found:
            return found, f"line {number}"
    found = date_in_name(stem, order)
    return (found, "the file name") if found else None


def impossible_in(text: str, stem: str, order: str = "MDY") -> str:
    """Where a note with no date has a date that cannot exist, where it stands and that it cannot, for the report."""
    places = [(f"line {number}", line) for number, line in enumerate(text.splitlines()[:DATE_LINES * 2], 1)]
    for where, line in [*places, ("the file name", re.sub(r"[_]", "-", stem))]:
        bad = impossible_date(line, order)
        if bad:
            return f"{bad!r} ({where}) is not a date that exists; "
    return ""


def parse_date(text: str, order: str = "MDY") -> dt.date | None:
    """The first full date written in a text (labtune.data.note_dates)."""
    found = first_date(text, order)
    return found.date if found else None


def us_date(date: dt.date) -> str:
    return f"{date.month}/{date.day}/{date.year}"


def _decode(path: Path) -> tuple[str, EmailNote | None]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise NoteError(f"{path}: cannot be read ({exc.strerror})") from None
    if path.suffix.lower() == ".eml":
        try:
            mail = read_email(raw)
        except ValueError as exc:
            raise NoteError(f"{path}: {exc}") from None
        return mail.text, mail
    if path.suffix.lower() in CONVERTED_SUFFIXES:
        try:
            text = document_text(path).strip()
        except ValueError as exc:
            raise NoteError(f"{path}: {exc}") from None
        if not text:
            raise NoteError(f"{path}: no text in the document (a scan? labtune does not read images)")
        return text, None
    if b"\x00" in raw[:8192]:
        raise NoteError(f"{path}: binary file, not a text note")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise NoteError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not text:
        raise NoteError(f"{path}: empty lab note")
    return text, None


def read_meetings(path: Path, date_order: str = "MDY", field_names: dict[str, list[str]] | None = None) -> list[Note]:
    """Every meeting of a note file: one, or one per dated heading of a running log or a document
    that holds several (labtune.data.note_sections), each with its own date, facts and line range;
    a schedule's dated rows (labtune.data.note_schedule)."""
    words = field_vocabulary(field_names)
    if path.suffix.lower() in SCHEDULE_SUFFIXES:
        return schedule_meetings(path, words, date_order)
    if path.suffix.lower() == ".mbox":
        return mailbox_meetings(path, words, date_order)
    text, mail = _decode(path)
    table = markdown_schedule(text, line_patterns(words)[2]) if mail is None else None
    rest = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("|"))
    if table and not find_dates(rest, date_order):  # a note of its own with a table of talks stays a note
        return schedule_meetings(path, words, date_order, table)
    org = path.suffix.lower() == ".org"
    date_lines = [(number - 1, found) for found, number in date_fields(text, words, date_order)]
    sections = meeting_sections(text, date_order, org, date_lines)
    if len(sections) < 2:
        return [_meeting(path, text, words, date_order, org, mail=mail)]
    lines = text.splitlines()
    meetings = []
    for section in sections:
        body = "\n".join(lines[section.start:section.end]).strip()
        note = _meeting(path, body, words, date_order, org, section.date, offset=section.start)
        note.lines = (section.start + 1, section.end)
        note.date_source = f"the heading on line {section.start + 1}" if section.level else "a Date: field"
        meetings.append(note)
    return meetings


def mailbox_meetings(path: Path, words: dict[str, tuple[str, ...]], date_order: str) -> list[Note]:
    """A meeting per message of an .mbox with a date; a reply is left out where the message it
    answers (a message of the same date that is no reply) is in the box."""
    import mailbox

    found: list[tuple[Note, EmailNote]] = []
    for number, message in enumerate(mailbox.mbox(path, create=False), 1):
        try:
            mail = read_email(message.as_bytes())
            note = _meeting(path, mail.text, words, date_order, org=False, mail=mail, undated_name=False)
        except (ValueError, NoteError):
            continue
        note.date_source = f"message {number}: {note.date_source}"
        found.append((note, mail))
    originals = {note.date for note, mail in found if not mail.reply}
    meetings = [note for note, mail in found if not (mail.reply and note.date in originals)]
    if not meetings:
        raise NoteError(f"{path}: no message of the mailbox has minutes with a date")
    return meetings


def schedule_meetings(path: Path, words: dict[str, tuple[str, ...]], date_order: str,
                      table: tuple[list[str], list[tuple[int, list[str]]]] | None = None) -> list[Note]:
    """A meeting per dated row of a schedule (a sheet, or a note file's Markdown `table`), its cells
    read as "Header: value" field lines."""
    try:
        header, rows = table or schedule_rows(path, line_patterns(words)[2])
    except ValueError as exc:
        raise NoteError(f"{path}: {exc}") from None
    meetings, undated = [], []
    for line, row in rows:
        text = "\n".join(f"{name.strip()}: {cell.strip()}" for name, cell in zip(header, row) if name.strip() and cell.strip())
        try:
            note = _meeting(path, text, words, date_order, org=False, undated_name=False)
        except NoteError:
            undated.append(line)
            continue
        for fact in note.facts:
            fact.line, fact.how = line, "schedule row"
        note.lines, note.date_source, note.schedule = (line, line), f"the date column (line {line})", True
        meetings.append(note)
    if not meetings:
        raise NoteError(f"{path}: no row of the schedule has a date in its date column")
    meetings[0].rejected += [f"line {line}: no date in the date column" for line in undated]
    return meetings


def read_note(path: Path, date_order: str = "MDY", field_names: dict[str, list[str]] | None = None) -> Note:
    """A file's meeting (its first, for a file that holds several: read_meetings): its date (see
    note_date), its facts (field lines, table rows, Org drawers, agenda items, then prose and
    action items: labtune.data.note_prose) and its text."""
    return read_meetings(path, date_order, field_names)[0]


def _meeting(path: Path, text: str, words: dict[str, tuple[str, ...]], date_order: str, org: bool,
             section_date: FoundDate | None = None, offset: int = 0, mail: EmailNote | None = None,
             undated_name: bool = True) -> Note:
    if section_date is None:
        dated = note_date(text, path.stem if undated_name else "", words, date_order)
        if dated is None and mail is not None and mail.sent is not None:
            dated = FoundDate(mail.sent, mail.sent.isoformat()), "the e-mail's Date: header"
        if dated is None:
            raise NoteError(f"{path}: {impossible_in(text, path.stem if undated_name else '', date_order)}{NO_DATE}")
        found, source = dated
        named = date_in_name(path.stem, date_order)
        if found.other_reading and named and named.date == found.date and not named.other_reading:
            found = FoundDate(found.date, found.text)  # the file name says which order was meant
    else:
        found, source = section_date, ""
    facts, rejected = read_fields(text, org=org, words=words)
    facts = resolve_names(facts)
    facts += agenda_facts(facts)
    facts = unique_facts(facts + prose_facts(text, facts, words))
    facts = [f for f in facts if f.field not in ("action_items", "agenda")] + action_facts(text, facts, found.date, words)
    facts += decision_facts(text, facts)
    facts += [topic] if (topic := subject_topic(text, facts, org)) else []
    facts += statement_facts(text, facts, found.date)
    if mail is not None and mail.sender and not any(f.field == "recorder" for f in facts):
        facts.append(NoteFact("recorder", mail.sender, 1, "e-mail sender"))  # whoever sends the minutes took them
    for fact in facts:
        fact.line += offset
    if offset:  # "line 3: ..." of a section is that line of the file
        rejected = [re.sub(r"^line (\d+)", lambda m: f"line {int(m.group(1)) + offset}", r) for r in rejected]
    return Note(path.name, found.date, text, joined_fields(facts), facts, source, found.other_reading, rejected)


def resolve_lab_names(notes: list[Note]) -> list[Note]:
    """A first name or handle its own meeting could not resolve ("@hiro" where the attendees do
    not list him) as the one full name the whole lab's notes give it, when exactly one does."""
    known = sorted({v for n in notes for f in n.facts for v in (f.value, f.owner or "")
                    if f.field in ("attendees", "presenter", "recorder", "action_items") and len(v.split()) > 1
                    and (f.field != "action_items" or v == f.owner)})
    for note in notes:
        changed = False
        for fact in note.facts:
            if fact.field in ("presenter", "recorder") and len(fact.value.split()) == 1:
                resolved = resolve(fact.value, known)
                changed |= resolved != fact.value
                fact.value = resolved
            if fact.owner and len(fact.owner.split()) == 1:
                resolved = resolve(fact.owner, known)
                changed |= resolved != fact.owner
                fact.owner = resolved
        if changed:
            note.fields = joined_fields(note.facts)
    return notes


def qa_conversation(conv_id: str, question: str, answer: str, fact: dict[str, Any] | None = None) -> dict[str, Any]:
    """One question-answer conversation in ShareGPT form, with the fact it teaches when given."""
    record: dict[str, Any] = {"id": conv_id, "conversations": [{"from": "human", "value": question},
                                                              {"from": "gpt", "value": answer}]}
    if fact:
        record["fact"] = fact  # what the answer must contain; the data stage turns held-out ones into eval prompts
    return record


def note_conversation(note: Note, note_id: str | None = None) -> dict[str, Any]:
    """FastChat's conversation for a whole note: its date asked, the note answered."""
    return qa_conversation(note_id or f"labnote_{note.date.isoformat()}", f"Lab meeting on {us_date(note.date)}", note.text)


class UnsafePathError(LabtuneError, ValueError):
    """A note name, link or key would lead outside its notes folder or prefix."""


def safe_relative(name: str, where: str) -> str:
    """name as a relative POSIX path that stays inside its folder or prefix: no absolute paths, no
    `..`, no backslashes, no empty parts."""
    path = PurePosixPath(name)
    if not name or name.startswith(("/", "\\")) or "\\" in name or path.is_absolute() or any(
            part in ("..", "") for part in name.split("/")):
        raise UnsafePathError(f"{where}: {name!r} escapes its folder (absolute path or '..')")
    return path.as_posix()


def note_files(folder: Path) -> list[Path]:
    """Every note file (NOTE_SUFFIXES: .md, .org, .txt, .eml, .docx, .pdf ...) in a folder and its
    sub-folders, sorted; the one listing the data stage and the watcher share. A symbolic link (to a file or a folder) that
    leads outside the folder is refused, naming it; links that stay inside are read where they
    point to, once. Hidden files and folders (a dot first) are not notes."""
    return [path for path in folder_files(folder) if path.suffix.lower() in NOTE_SUFFIXES]


def _unreadable(exc: OSError) -> None:
    """os.walk passes over a folder it cannot list in silence: a notes folder is named instead."""
    raise LabtuneError(f"{exc.filename}: cannot be read ({exc.strerror or type(exc).__name__})")


def folder_files(folder: Path) -> list[Path]:
    """Every file in a folder and its sub-folders but hidden ones, sorted (see note_files)."""
    root = folder.resolve()
    found: list[Path] = []
    for directory, subdirs, files in os.walk(folder, followlinks=False, onerror=_unreadable):
        here = Path(directory)
        for name in sorted(subdirs):
            if (here / name).is_symlink():
                _inside(here / name, folder, root)  # links inside are walked at their real place
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and not (here / d).is_symlink())
        for name in files:
            path = here / name
            if name.startswith("."):
                continue
            if path.is_symlink():
                _inside(path, folder, root)
            if path.is_file():
                found.append(path)
    return sorted(found)


def unread_files(folder: Path) -> tuple[list[tuple[Path, str]], list[Path]]:
    """The files of a folder that are not notes: documents labtune does not read (each with the
    reason, for the data report) and the rest (images, binaries: counted, not listed one by one)."""
    documents: list[tuple[Path, str]] = []
    others: list[Path] = []
    for path in folder_files(folder):
        suffix = path.suffix.lower()
        if suffix in NOTE_SUFFIXES:
            continue
        if suffix in DOCUMENT_SUFFIXES:
            documents.append((path, f"unsupported format {suffix}: not read (save it as Markdown or text)"))
            continue
        try:
            with path.open("rb") as handle:
                head = handle.read(8192)
        except OSError as exc:
            documents.append((path, f"cannot be read ({exc.strerror})"))
            continue
        try:
            text = b"\x00" not in head and head.decode("utf-8", errors="strict") is not None
        except UnicodeDecodeError as exc:
            text = exc.start > len(head) - 4  # a character cut at the 8 KiB boundary
        if text:
            documents.append((path, f"unsupported format {suffix or '(no extension)'}: a text file, not read "
                                    "(name it .md or .txt to read it as a note)"))
        else:
            others.append(path)
    return documents, others


def _inside(link: Path, folder: Path, root: Path) -> None:
    target = link.resolve()
    if not target.is_relative_to(root):
        raise UnsafePathError(f"{folder}: {link.relative_to(folder)} links outside the notes folder (to {target})")


def meeting_documents(folder: Path, date_order: str = "MDY", field_names: dict[str, list[str]] | None = None
                   ) -> list[dict[str, Any]]:
    """{file, date, text, fields} of every meeting of the readable notes in a folder: what retrieval
    (labtune.evaluation.retrieval) indexes and the data output keeps as notes.json."""
    documents = []
    for path in note_files(folder):
        try:
            meetings = read_meetings(path, date_order, field_names)
        except NoteError:
            continue
        for note in meetings:  # a running log is one document per meeting
            where = path.relative_to(folder).as_posix()
            documents.append({"file": f"{where}:{note.lines[0]}-{note.lines[1]}" if note.lines else where,
                              "date": note.date.isoformat(), "text": note.text, "fields": note.fields})
    return documents
