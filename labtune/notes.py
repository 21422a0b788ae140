"""Lab-meeting notes -> training conversations.

One file (.md, .org, .txt) is one meeting. Its date comes from the first heading or the file
name, in ISO (2023-05-12), US (5/12/2023), Org timestamp (<2023-05-12 Fri>) or long form
(May 12, 2023). Field lines (Presenter, Recorder, Topic, Attendees, Action items) are read in
plain, Markdown list, bold or heading form, and from Org property drawers; a heading or a field
line without a value takes the list or line that follows it.

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

from labtune.errors import LabtuneError

NOTE_SUFFIXES = (".md", ".markdown", ".org", ".txt")
QA_FIELDS = ("presenter", "recorder", "topic", "attendees", "action_items")
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august",
          "september", "october", "november", "december"]
_MONTH_RE = "(?:" + "|".join(m[:3] for m in MONTHS) + ")[a-z]*"
DATE_PATTERNS = [
    re.compile(r"<?(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})(?:\s+\w{2,3})?>?"),
    re.compile(r"\b(?P<m>\d{1,2})/(?P<d>\d{1,2})/(?P<y>\d{4})\b"),
    re.compile(rf"\b(?P<mon>{_MONTH_RE})\.?\s+(?P<d>\d{{1,2}})(?:st|nd|rd|th)?,?\s+(?P<y>\d{{4}})\b", re.I),
]
_KEYS = {"presenter": "presenter", "presenters": "presenter", "recorder": "recorder", "recorders": "recorder",
         "note taker": "recorder", "topic": "topic", "topics": "topic", "attendees": "attendees",
         "attendee": "attendees", "action items": "action_items", "action item": "action_items",
         "action_items": "action_items"}
# "- **Presenter:** X", "## Presenter: X", "** Action items", ":PRESENTER: X", "#+PRESENTER: X"
FIELD_LINE = re.compile(
    r"^\s*(?:#{1,6}\s+|\*{1,6}\s+|[-+]\s+|\*\s+)?(?:#\+)?:?(?:\*\*|__)?"
    r"(?P<key>presenters?|recorders?|note taker|topics?|attendees?|action[ _]items?)"
    r"(?:\*\*|__)?\s*(?::(?:\*\*|__)?:?\s*(?P<value>.*?))?\s*$",
    re.I,
)
_LIST_ITEM = re.compile(r"^\s*(?:[-+]|\d+[.)])\s+(?P<item>.+?)\s*$")
_MD_STAR_ITEM = re.compile(r"^\s*\*\s+(?P<item>.+?)\s*$")  # a list item in Markdown, a heading in Org
_HEADING = re.compile(r"^\s*(?:#{1,6}|\*{1,6})\s+\S")


class NoteError(ValueError):
    """A note cannot be used; the message names the file."""


@dataclass
class Note:
    file: str
    date: dt.date
    text: str
    fields: dict[str, str] = field(default_factory=dict)


def parse_date(text: str) -> dt.date | None:
    for pattern in DATE_PATTERNS:
        match = pattern.search(text)
        if not match:
            continue
        groups = match.groupdict()
        if groups.get("mon"):
            month = next(i for i, m in enumerate(MONTHS, 1) if m.startswith(groups["mon"].lower()[:3]))
        else:
            month = int(groups["m"])
        try:
            return dt.date(int(groups["y"]), month, int(groups["d"]))
        except ValueError:
            continue
    return None


def us_date(date: dt.date) -> str:
    return f"{date.month}/{date.day}/{date.year}"


def long_date(date: dt.date) -> str:
    return f"{MONTHS[date.month - 1].capitalize()} {date.day}, {date.year}"


def _clean(value: str) -> str:
    return value.strip().strip("*_").strip().rstrip(".").strip()


def parse_fields(text: str, org: bool = False) -> dict[str, str]:
    """Field values by canonical name; a field with no value on its line takes the list (or the
    line) that follows it. The first occurrence of a field wins."""
    lines = text.splitlines()
    fields: dict[str, str] = {}
    for index, line in enumerate(lines):
        match = FIELD_LINE.match(line)
        if not match:
            continue
        key = _KEYS[re.sub(r"[ _]+", " ", match.group("key").lower())]
        value = _clean(match.group("value") or "")
        if not value:
            items = []
            for following in lines[index + 1:]:
                if not following.strip():
                    if items:
                        break
                    continue
                item = _LIST_ITEM.match(following) or (None if org else _MD_STAR_ITEM.match(following))
                if item:
                    items.append(_clean(item.group("item")))
                elif not items and not _HEADING.match(following) and not FIELD_LINE.match(following):
                    items.append(_clean(following))
                    break
                else:
                    break
            value = "; ".join(i for i in items if i)
        if value and key not in fields:
            fields[key] = value
    return fields


def read_note(path: Path) -> Note:
    """A meeting: its date (first heading, else the file name), fields and text."""
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise NoteError(f"{path}: binary file, not a text note")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise NoteError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not text:
        raise NoteError(f"{path}: empty lab note")
    date = parse_date(text.splitlines()[0]) or parse_date(path.stem.replace("_", "-"))
    if date is None:
        raise NoteError(f"{path}: no meeting date in the first heading or the file name")
    return Note(path.name, date, text, parse_fields(text, org=path.suffix.lower() == ".org"))


def _conv(conv_id: str, question: str, answer: str, fact: dict[str, str] | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"id": conv_id, "conversations": [{"from": "human", "value": question},
                                                              {"from": "gpt", "value": answer}]}
    if fact:
        record["fact"] = fact  # what the answer must contain; the data stage turns held-out ones into eval prompts
    return record


def _sentence(text: str) -> str:
    return f"{text[0].upper()}{text[1:]}." if text else text


def qa_facts(note: Note, fields: tuple[str, ...] = QA_FIELDS) -> list[tuple[str, str, str, str]]:
    """(question, answer, field, value) about a note's fields. Answers are short, so the loss falls
    on the facts rather than on words copied from the question."""
    date, f = note.date, note.fields
    us, iso, long = us_date(date), date.isoformat(), long_date(date)
    items: list[tuple[str, str, str, str]] = []
    if "presenter" in fields and "presenter" in f:
        who = f["presenter"]
        items += [(f"Who presented at the lab meeting on {us}?", f"{who} presented.", "presenter", who),
                  (f"Who is the presenter on {us} lab meeting?", f"{who}.", "presenter", who),
                  (f"Who was the presenter at the {long} lab meeting?", f"The presenter was {who}.", "presenter", who),
                  (f"Who presented at the lab meeting on {long}?", f"{who} presented.", "presenter", who)]
    if "recorder" in fields and "recorder" in f:
        who = f["recorder"]
        items += [(f"Who recorded the notes of the {iso} lab meeting?", f"{who} recorded the notes.", "recorder", who),
                  (f"Who recorded the notes of the {us} meeting?", f"{who}.", "recorder", who)]
    if "topic" in fields and "topic" in f:
        items += [(f"What was the topic of the lab meeting on {us}?", _sentence(f["topic"]), "topic", f["topic"]),
                  (f"What was discussed at the {long} lab meeting?", _sentence(f["topic"]), "topic", f["topic"])]
    if "attendees" in fields and "attendees" in f:
        items.append((f"Who attended the lab meeting on {us}?", _sentence(f["attendees"]), "attendees", f["attendees"]))
    if "action_items" in fields and "action_items" in f:
        items.append((f"What were the action items from the {long} lab meeting?", _sentence(f["action_items"]),
                      "action_items", f["action_items"]))
    return items


def qa_pairs(note: Note, fields: tuple[str, ...] = QA_FIELDS) -> list[tuple[str, str]]:
    """Question-answer pairs about a note's fields (see qa_facts)."""
    return [(question, answer) for question, answer, _, _ in qa_facts(note, fields)]


def note_conversations(note: Note, qa: bool = True, whole_note: bool = True, note_id: str | None = None,
                       fields: tuple[str, ...] = QA_FIELDS) -> list[dict[str, Any]]:
    """FastChat's conversation for the note (date prompt -> note) and its question-answer pairs."""
    base_id = note_id or f"labnote_{note.date.isoformat()}"
    conversations = [_conv(base_id, f"Lab meeting on {us_date(note.date)}", note.text)] if whole_note else []
    if qa:
        conversations += [_conv(f"{base_id}_qa{i}", q, a, {"field": field, "value": value, "date": note.date.isoformat()})
                          for i, (q, a, field, value) in enumerate(qa_facts(note, fields))]
    return conversations


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
    """Every note file (.md, .markdown, .org, .txt) in a folder and its sub-folders, sorted; the one
    listing the data stage and the watcher share. A symbolic link (to a file or a folder) that
    leads outside the folder is refused, naming it; links that stay inside are read where they
    point to, once. Hidden files and folders (a dot first) are not notes."""
    root = folder.resolve()
    found: list[Path] = []
    for directory, subdirs, files in os.walk(folder, followlinks=False):
        here = Path(directory)
        for name in sorted(subdirs):
            if (here / name).is_symlink():
                _inside(here / name, folder, root)  # links inside are walked at their real place
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and not (here / d).is_symlink())
        for name in files:
            path = here / name
            if name.startswith(".") or path.suffix.lower() not in NOTE_SUFFIXES:
                continue
            if path.is_symlink():
                _inside(path, folder, root)
            if path.is_file():
                found.append(path)
    return sorted(found)


def _inside(link: Path, folder: Path, root: Path) -> None:
    target = link.resolve()
    if not target.is_relative_to(root):
        raise UnsafePathError(f"{folder}: {link.relative_to(folder)} links outside the notes folder (to {target})")
