"""Field lines of a lab note: the words labs use for each field (FIELD_WORDS, and a recipe's own)
in every line shape, and the facts they give. Read by labtune.data.notes; prose and action items are
labtune.data.note_prose's."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from labtune.data.note_dates import find_dates

# The words labs use for each field. Data, not code: a recipe adds its own (data.field_names).
FIELD_WORDS: dict[str, tuple[str, ...]] = {
    "presenter": ("presenter", "presenters", "presenter(s)", "speaker", "speakers", "presented by", "presenting",
                  "talk by", "presentation by"),
    "recorder": ("recorder", "recorders", "recorded by", "minutes", "minutes by", "minute taker", "minute-taker",
                 "minutes taker", "scribe", "note taker", "note-taker", "notetaker", "notes taken by", "notes by",
                 "notes", "taking notes"),
    "topic": ("topic", "topics", "subject", "title", "talk title", "talk"),
    # agenda items "Name - topic" give presenter and topic (labtune.data.note_prose.agenda_facts)
    "agenda": ("agenda", "agenda items"),
    "attendees": ("attendees", "attendee", "attendance", "present", "participants", "attending"),
    "action_items": ("action items", "action item", "action_items", "actions", "action", "todo", "todos", "to do",
                     "to-do", "to-dos", "next steps", "follow-ups", "follow ups", "followups", "follow-up"),
    "decisions": ("decisions", "decision", "decided", "decisions made", "agreed", "agreements", "agreed on",
                  "outcomes", "outcome", "resolutions", "resolved"),
    "date": ("date", "when", "meeting date"),
}
# the one list of each kind of field: the people fields, the short facts a substring check can
# judge (asked in many wordings, held out, scored), and every field the notes teach (data.qa_fields)
PERSON_FIELDS = ("presenter", "recorder")
SHORT_FIELDS = (*PERSON_FIELDS, "topic")
QA_FIELDS = (*SHORT_FIELDS, "attendees", "action_items", "decisions")
_LIST_ITEM = re.compile(r"^\s*(?:[-+]|\d+[.)])\s+(?:\[[ xX]\]\s+)?(?P<item>.+?)\s*$")
_MD_STAR_ITEM = re.compile(r"^\s*\*\s+(?:\[[ xX]\]\s+)?(?P<item>.+?)\s*$")  # a list item in Markdown, a heading in Org
HEADING = re.compile(r"^\s*(?:#{1,6}|\*{1,6})\s+\S")


@dataclass
class NoteFact:
    """One thing a note says, and where: line 1 is the file's first line."""

    field: str
    value: str
    line: int
    how: str  # "field line", "table", "drawer", "heading", "prose"
    owner: str | None = None  # an action item's
    due: str | None = None  # an action item's due date, ISO
    rank: int = 0  # among several topic lines, the lowest wins
    source: str | None = None  # the file it came from, when not its note's (a schedule row merged into the note)
    kind: str | None = None  # a statement's: result, plan or said (labtune.data.statements)


def field_vocabulary(extra: dict[str, list[str]] | None = None) -> dict[str, tuple[str, ...]]:
    """FIELD_WORDS with a recipe's own words added (data.field_names)."""
    words = {name: tuple(values) for name, values in FIELD_WORDS.items()}
    for name, added in (extra or {}).items():
        words[name] = tuple(dict.fromkeys([*words.get(name, ()), *(w.strip().lower() for w in added if w.strip())]))
    return words


def _key_pattern(words: dict[str, tuple[str, ...]]) -> str:
    spellings = sorted({w for ws in words.values() for w in ws}, key=len, reverse=True)
    return "|".join(r"[ _-]+".join(re.escape(part) for part in re.split(r"[ _-]+", w)) for w in spellings)


@functools.lru_cache(maxsize=16)
def _line_patterns(words_key: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[re.Pattern, re.Pattern, dict[str, str]]:
    words = dict(words_key)
    keys = _key_pattern(words)
    # "Presenter: X", "- **Presenter**: X", "**Presenter:** X", "## Presenter - X", "Recorder — X",
    # ":PRESENTER: X", "#+PRESENTER: X", "Presenter:" (the list or line that follows), "## Presenter"
    field_line = re.compile(
        r"^\s*(?:#{1,6}\s+|\*{1,6}\s+|[-+*]\s+|\d+[.)]\s+)?(?:\[[ xX]\]\s+)?(?:#\+)?:?(?:\*\*|__)?"
        rf"(?P<key>{keys})(?:\*\*|__)?\s*"
        r"(?:(?P<sep>:|—|–|=|-(?=\s)|\s-)(?:\*\*|__)?:?\s*(?P<value>.*?))?\s*$",
        re.IGNORECASE)
    table_row = re.compile(rf"^\s*\|\s*(?:\*\*|__)?(?P<key>{keys})(?:\*\*|__)?\s*:?\s*\|\s*(?P<value>[^|]*?)\s*\|?\s*$",
                           re.IGNORECASE)
    canonical = {re.sub(r"[ _-]+", " ", w): name for name, ws in words.items() for w in ws}
    return field_line, table_row, canonical


def line_patterns(words: dict[str, tuple[str, ...]]):
    return _line_patterns(tuple(sorted(words.items())))


def canonical_key(key: str, canonical: dict[str, str]) -> str:
    return canonical[re.sub(r"[ _-]+", " ", key.lower())]


def _clean(value: str) -> str:
    return value.strip().strip("*_").strip().rstrip(".").strip()


_NAME_WORD = r"[A-Za-zÀ-ÖØ-öø-ÿĀ-žА-я][\w'’.-]*"
_PERSON = re.compile(rf"^@?{_NAME_WORD}(?:\s+{_NAME_WORD}){{0,3}}$")
_NOT_NAMES = {"tbd", "tba", "none", "n/a", "na", "nobody", "everyone", "all", "see below", "see above", "?"}
# words of a phrase, not of a name ("see the shared slides")
_PHRASE_WORDS = {"the", "a", "an", "see", "of", "to", "in", "on", "for", "at", "by", "with", "from", "is", "are", "was",
                 "will", "be", "slides", "below", "above", "notes", "no", "not", "none", "one", "our", "we", "this",
                 "that", "it", "who", "whoever", "next", "week", "today", "tomorrow", "later", "shared", "doc", "link"}


def _looks_like_name(part: str) -> bool:
    words = part.lstrip("@").split()
    if len(words) == 1:
        return True
    if any(w.lower() in _PHRASE_WORDS for w in words):
        return False
    return any(w[0].isupper() for w in words) or len(words) <= 2


def split_people(value: str) -> list[str] | None:
    """"Hannah Müller and Wei Zhang" -> both; None when the value is not a list of names (a
    sentence, a list of notes), so that a heading such as "Minutes" over the discussion is not
    taken for the recorder."""
    value = re.sub(r"\([^)]*\)", "", value)  # "(PI)", "(remote)"
    parts = [_clean(p) for p in re.split(r"\s*(?:,|;|&|/|\band\b|\+)\s*", value) if _clean(p)]
    if not parts or any(not _PERSON.match(p) or p.lower() in _NOT_NAMES or not _looks_like_name(p) for p in parts) \
            or len(parts) > 8:
        return None
    return [p.lstrip("@") for p in parts]


def _following_items(lines: list[str], index: int, org: bool, field_line: re.Pattern) -> list[tuple[int, str]]:
    """The list (or the one line) under a field line or heading without a value: (line number, item)."""
    items: list[tuple[int, str]] = []
    for number, following in enumerate(lines[index + 1:], index + 2):
        if not following.strip():
            if items:
                break
            continue
        item = _LIST_ITEM.match(following) or (None if org else _MD_STAR_ITEM.match(following))
        if item:
            items.append((number, _clean(item.group("item"))))
        elif not items and not HEADING.match(following) and not field_line.match(following):
            items.append((number, _clean(following)))
            break
        else:
            break
    return [(n, i) for n, i in items if i]


def read_fields(text: str, org: bool = False, words: dict[str, tuple[str, ...]] | None = None
                ) -> tuple[list[NoteFact], list[str]]:
    """The facts a note's field lines and table rows give, and the field lines rejected (a person
    field whose value is not names). Several lines of one field give several values."""
    field_line, table_row, canonical = line_patterns(words or FIELD_WORDS)
    lines = text.splitlines()
    facts: list[NoteFact] = []
    rejected: list[str] = []
    for index, line in enumerate(lines):
        match = table_row.match(line)
        how = "table"
        if not match:
            match = field_line.match(line)
            how = "drawer" if line.lstrip().startswith(":") else "heading" if HEADING.match(line) else "field line"
        if not match:
            continue
        name = canonical_key(match.group("key"), canonical)
        value = _clean(match.group("value") or "")
        entries = [(index + 1, value)] if value else _following_items(lines, index, org, field_line)
        if name == "date" or not entries:
            continue
        if name in PERSON_FIELDS or name == "attendees":
            people = [(number, split_people(v)) for number, v in entries]
            if any(names is None for _, names in people):
                if name in PERSON_FIELDS and value:  # a heading such as "Minutes" over the discussion is no field
                    rejected.append(f"line {index + 1}: {match.group('key')}: {value[:60]!r} is not a name")
                continue
            facts += [NoteFact(name, person, number, how) for number, names in people for person in names or []]
        elif name == "topic":
            value = "; ".join(v for _, v in entries)
            if not find_dates(value):  # "#+TITLE: Lab meeting <2023-04-28 Fri>" names the meeting, not its topic
                facts.append(NoteFact(name, value, entries[0][0], how, rank=_topic_rank(match.group("key"), words)))
        else:  # action items, agenda items, decisions: one fact each
            facts += [NoteFact(name, v, n, how) for n, v in entries]
    return unique_facts(facts), rejected


def _topic_rank(key: str, words: dict[str, tuple[str, ...]] | None) -> int:
    """"Topic" before "Subject" before "Title" ...: the order of FIELD_WORDS["topic"]."""
    spelled = re.sub(r"[ _-]+", " ", key.lower())
    ordered = [re.sub(r"[ _-]+", " ", w) for w in (words or FIELD_WORDS)["topic"]]
    return ordered.index(spelled) if spelled in ordered else len(ordered)


def unique_facts(facts: list[NoteFact]) -> list[NoteFact]:
    """Each value once per field, and one topic: the best-named one (see _topic_rank), else the first."""
    topics = [f for f in facts if f.field == "topic"]
    best = min(topics, key=lambda f: f.rank) if topics else None
    seen: set[tuple[str, str]] = set()
    kept = []
    for fact in facts:
        key = (fact.field, fact.value.lower())
        if key not in seen and (fact.field != "topic" or fact is best):
            seen.add(key)
            kept.append(fact)
    return kept


def parse_fields(text: str, org: bool = False, words: dict[str, tuple[str, ...]] | None = None) -> dict[str, str]:
    """Field values by canonical name, several values joined ("A, B"; action items "x; y")."""
    return joined_fields(read_fields(text, org, words)[0])


def joined_fields(facts: list[NoteFact]) -> dict[str, str]:
    fields: dict[str, list[str]] = {}
    for fact in facts:
        if fact.field == "statement":  # the note's own sentences: in facts.json, not a field to display
            continue
        value = f"{fact.owner}: {fact.value}" if fact.owner else fact.value
        fields.setdefault(fact.field, []).append(value + (f" (due {fact.due})" if fact.due else ""))
    return {name: ("; " if name in ("action_items", "topic", "decisions") else ", ").join(values) for name, values in fields.items()}




def people(notes: list[Any]) -> list[str]:
    """Every person the notes name as presenter, recorder or attendee (from Notes or their fields
    dicts), for the names scorer and the questions that need a wrong name."""
    found: set[str] = set()
    for note in notes:
        fields = getattr(note, "fields", note)
        for field in (*PERSON_FIELDS, "attendees"):
            for name in fields.get(field, "").replace(";", ",").split(","):
                if name.strip() and len(name.split()) <= 4:
                    found.add(name.strip())
    return sorted(found)
