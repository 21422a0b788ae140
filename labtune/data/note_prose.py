"""Facts from sentences and action items: what a careful reader takes from a note's prose.

No NLP library here: spaCy reads names well but its English model is a separate download (no PyPI
release of it is kept by its authors), and nothing may download at run time. Instead, a small set
of role patterns, each a sentence shape labs write:

- presenter: "X presented (on) T", "X walked us (the group) through T", "X gave the (a) talk on T",
  "X talked (spoke) about T", "X led the discussion on T", "X took us through T", "the talk was
  given by X", "X was the presenter (speaker)";
- recorder: "X took (the) notes (minutes)", "X kept (wrote) the notes (minutes)", "notes (minutes)
  (taken, kept) by X", "X was the scribe (note taker, recorder)";
- action items (under an action-items field, a TODO line, or a sentence with a due date): "TODO
  (X): T by D", "X: T", "@x T (due D)", "X to T by D", "X will T before D", "X owns T, due D".

X is one to three capitalised words (or an @handle) that is not a sentence opener such as "Today";
a first name alone is resolved to the full name of the meeting's attendee or presenter it begins,
when exactly one does. A sentence that names a person without one of these roles gives no fact:
nothing is invented. Prose fills only the fields the note's field lines left empty.
"""

from __future__ import annotations

import datetime as dt
import re

from labtune.data.note_dates import find_dates
from labtune.data.note_fields import FIELD_WORDS, HEADING, NoteFact, line_patterns, split_people

_CAP = r"[A-ZÀ-ÖØ-ÞĀ-Ž][\w'’-]+"
NAME = rf"(?P<who>@[\w.-]+|{_CAP}(?:\s+(?:van|von|de|da|del|di|le|la|bin|ibn)?\s*{_CAP}){{0,2}})"
# capitalised words that open a sentence and are nobody
OPENERS = {"today", "then", "next", "also", "we", "the", "this", "that", "everyone", "group", "lab", "after", "before",
           "finally", "first", "later", "she", "he", "they", "it", "our", "someone", "nobody", "afterwards", "meanwhile",
           "briefly", "again", "here", "there", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday",
           "sunday", "in", "on", "at", "for", "as", "and", "but", "so", "a", "an", "dr", "prof"}
TOPIC = r"(?P<topic>[^.;!?]{3,120}?)"
_END = r"\s*(?:[.;!?]|,\s|$)"
PRESENTER_PROSE = [
    re.compile(rf"\b{NAME}\s+(?:presented|walked\s+(?:us|the\s+(?:group|lab|team))\s+through|took\s+us\s+through|"
               rf"gave\s+(?:the|a|an|her|his|their)\s+(?:talk|presentation|update)\s+(?:on|about)|"
               rf"(?:talked|spoke)\s+(?:about|on)|led\s+the\s+discussion\s+(?:on|of|about)|presented\s+(?:on|about))\s+"
               rf"{TOPIC}{_END}"),
    re.compile(rf"\b{NAME}\s+(?:presented|gave\s+the\s+talk|gave\s+a\s+talk|was\s+(?:the\s+|our\s+)?(?:presenter|speaker))"
               rf"(?:\s+(?:today|this\s+week))?{_END}"),
    re.compile(rf"\b(?:talk|presentation)\s+(?:was\s+)?(?:given\s+)?by\s+{NAME}{_END}", re.IGNORECASE),
]
RECORDER_PROSE = [
    re.compile(rf"\b{NAME}\s+(?:took|kept|wrote|recorded)\s+(?:the\s+)?(?:notes|minutes)\b"),
    re.compile(rf"\b(?:[Nn]otes|[Mm]inutes)\s+(?:were\s+)?(?:taken\s+|kept\s+|recorded\s+|written\s+)?by\s+{NAME}"),
    re.compile(rf"\b{NAME}\s+(?:was|is)\s+(?:the\s+|our\s+)?(?:scribe|note[- ]?taker|recorder|minute[- ]taker)\b"),
]


def _name(raw: str) -> str | None:
    words = raw.lstrip("@").split()
    while words and words[0].lower().strip(".") in OPENERS:
        words = words[1:]
    if not words:
        return None
    name = " ".join(words)
    people = split_people(name)
    return people[0] if people and len(people) == 1 else None


def _handle_matches(handle: str, full: str) -> bool:
    """"ines", "ines.f", "ines_ferreira", "iferreira", "ferreira" for Ines Ferreira."""
    handle = handle.lower().lstrip("@")
    parts = full.lower().split()
    first, last = parts[0], parts[-1]
    pieces = [p for p in re.split(r"[._-]+", handle) if p]
    if not pieces:
        return False
    return (pieces[0] == first or handle in (last, first[0] + last, first + last, first + "." + last)
            or (len(pieces) > 1 and pieces[0] == first and last.startswith(pieces[-1])))


def resolve(name: str, known: list[str]) -> str:
    """A first name or handle as the one full name of the meeting's people it names ("Ines",
    "@ines", "@iferreira" -> Ines Ferreira); left as written when none or several do."""
    if len(name.split()) != 1:
        return name
    matches = {k for k in known if len(k.split()) > 1 and k.lower() != name.lower() and _handle_matches(name, k)}
    return matches.pop() if len(matches) == 1 else name


def resolve_names(facts: list[NoteFact]) -> list[NoteFact]:
    """A presenter or recorder written as a first name ("Recorder: priya") as the meeting's
    attendee whose full name it begins, when exactly one does."""
    known = [f.value for f in facts if f.field in ("attendees", "presenter", "recorder") and len(f.value.split()) > 1]
    for fact in facts:
        if fact.field in ("presenter", "recorder") and len(fact.value.split()) == 1:
            fact.value = resolve(fact.value, known)
    return facts


def _sentences(text: str) -> list[tuple[int, str]]:
    """(line number, sentence) of the prose, not field lines or headings; a sentence wrapped over
    several lines of a paragraph is one sentence, numbered by the line it starts on."""
    field_line, table_row, _ = line_patterns(FIELD_WORDS)
    found: list[tuple[int, str]] = []
    paragraph: list[tuple[int, str]] = []

    def flush() -> None:
        if not paragraph:
            return
        joined, starts = "", []
        for number, body in paragraph:
            starts.append((len(joined), number))
            joined += body + " "
        position = 0
        for sentence in re.split(r"(?<=[.!?])\s+", joined):
            if sentence.strip():
                offset = joined.index(sentence, position)
                found.append((max(n for start, n in starts if start <= offset), sentence.strip()))
                position = offset + len(sentence)
        paragraph.clear()

    depth = 0
    for number, line in enumerate(text.splitlines(), 1):
        item = re.match(r"^\s*(?:[-+*]|\d+[.)])\s+", line)
        body = line[item.end():].strip() if item else line.strip()
        if not body or body.startswith(("#", "|", ":")) or field_line.match(line) or table_row.match(line):
            flush()
            continue
        if item:  # a list item is a paragraph of its own
            flush()
            paragraph.append((number, body))
            flush()
            continue
        indent = len(line) - len(line.lstrip())
        if paragraph and indent != depth:  # an indented line under a field, or the text after it: its own paragraph
            flush()
        paragraph.append((number, body))
        depth = indent
    flush()
    return found


def prose_facts(text: str, facts: list[NoteFact], words: dict | None = None) -> list[NoteFact]:
    """Presenter, recorder and topic from sentences, for the fields the field lines left empty."""
    have = {f.field for f in facts}
    known = [f.value for f in facts if f.field in ("attendees", "presenter", "recorder")]
    found: list[NoteFact] = []
    presenters = [f.value for f in facts if f.field == "presenter"]
    for number, sentence in _sentences(text):
        for field, patterns in (("presenter", PRESENTER_PROSE), ("recorder", RECORDER_PROSE)):
            # a presenter the field lines named still gives the topic their sentence states
            if field in have and not (field == "presenter" and "topic" not in have):
                continue
            for pattern in patterns:
                for match in pattern.finditer(sentence):
                    who = _name(match.group("who"))
                    if who is None:
                        continue
                    who = resolve(who, known)
                    if field in have:
                        if who not in presenters:
                            continue
                    else:
                        found.append(NoteFact(field, who, number, "prose"))
                    topic = match.groupdict().get("topic")
                    if field == "presenter" and topic and "topic" not in have and not any(f.field == "topic" for f in found):
                        found.append(NoteFact("topic", topic.strip().rstrip(","), number, "prose"))
        have |= {f.field for f in found if f.field != "topic"} if found else set()
    return found


_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_DUE = re.compile(rf"[\s,;(]*\b(?:due(?:\s+(?:by|on))?|by|before|until|no\s+later\s+than)\s+(?:the\s+)?"
                  rf"(?P<due>(?:{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{4}})?|\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?"
                  rf"{_MONTH}(?:\s+\d{{4}})?|\d{{1,2}}/\d{{1,2}}(?:/\d{{2,4}})?|\d{{4}}-\d{{2}}-\d{{2}}))\s*\)?\s*[.;]?\s*$",
                  re.IGNORECASE)
_LEAD = re.compile(r"^\s*(?:[-+*]|\d+[.)])?\s*(?:\[[ xX]\]\s*)?(?:(?:TODO|To-?do|Action(?:\s+item)?|AI)\b\s*)?", re.IGNORECASE)
_OWNER_PAREN = re.compile(r"^\(\s*(?P<who>[^)]{2,40})\)\s*[:\-–—]?\s*")
_OWNER_HANDLE = re.compile(r"^@(?P<who>[\w.-]+)[:,]?\s+")
_OWNER_COLON = re.compile(r"^(?P<who>[^:–—]{2,40}?)\s*(?::|\s[-–—])\s+")
_OWNER_VERB = re.compile(rf"^{NAME}\s+(?:to|will|owns|is\s+to|agreed\s+to|takes|took\s+on|volunteered\s+to)\s+")
_OWNER_TAIL = re.compile(r"\s*\((?P<who>[^)]{2,40})\)\s*$")
# a TODO or Action line, or a checkbox item ("- [ ] @Ines rerun the evaluation (due 5/5)"), anywhere in a note
_ACTION_LINE = re.compile(r"^\s*(?:(?:[-+*]\s+)?(?:\[[ xX]\]\s+)?(?:TODO|To-?do|Action(?:\s+item)?)\b|[-+*]\s+\[[ xX]\]\s)",
                          re.IGNORECASE)


# Org: "*** TODO [#A] Lea Dubois: submit the abstract  :lea:" over "DEADLINE: <2023-09-15 Fri>" and a
# drawer that may name the :OWNER:
_ORG_TODO = re.compile(r"^\*+\s+(?:TODO|DONE|NEXT|WAITING|WAIT|STARTED|DOING)\s+(?:\[#[A-Z]\]\s+)?(?P<title>.*?)"
                       r"(?:\s+:(?P<tags>[\w@.:]+):)?\s*$")
_ORG_HEADLINE = re.compile(r"^\*+\s")
_ORG_PLANNING = re.compile(r"\b(?P<kind>DEADLINE|SCHEDULED):\s*[<\[](?P<date>\d{4}-\d{2}-\d{2})[^>\]]*[>\]]")
_ORG_OWNER = re.compile(r"^\s*:(?:OWNER|ASSIGNEE|ASSIGNED|WHO|RESPONSIBLE):\s*(?P<who>.+?)\s*$", re.IGNORECASE)


def org_todo_items(lines: list[str]) -> list[tuple[int, str]]:
    """(line, item) of each Org TODO/DONE headline, as an action item line reads: the owner from the
    headline, else its :OWNER: property, else its first tag; the DEADLINE (else SCHEDULED) as the due date."""
    items = []
    for index, line in enumerate(lines):
        todo = _ORG_TODO.match(line)
        if not todo or not todo.group("title"):
            continue
        owner, dates = None, {}
        for follow in lines[index + 1 : index + 10]:
            if _ORG_HEADLINE.match(follow):
                break
            for planning in _ORG_PLANNING.finditer(follow):
                dates.setdefault(planning.group("kind"), planning.group("date"))
            owned = _ORG_OWNER.match(follow)
            owner = owner or (owned.group("who") if owned else None)
        tags = [t for t in (todo.group("tags") or "").split(":") if t]
        owner = owner or (tags[0].lstrip("@").replace("_", " ") if tags else None)
        item = todo.group("title")
        if owner and not _OWNER_COLON.match(item) and not _OWNER_VERB.match(item):
            item = f"{owner}: {item}"
        due = dates.get("DEADLINE") or dates.get("SCHEDULED")
        items.append((index + 1, f"{item} (due {due})" if due else item))
    return items


def due_date(text: str, meeting: dt.date, order: str = "MDY") -> dt.date | None:
    """A due date as written ("March 17", "5/5", "April 7th", "2023-05-02"), in the meeting's year
    unless it names one; a date more than a month before the meeting is the next year's."""
    full = find_dates(text, order)
    if full:
        return full[0].date
    from dateutil import parser as date_parser

    cleaned = re.sub(r"\b(?:the|of)\s+", "", text, flags=re.IGNORECASE)
    try:
        first = date_parser.parse(cleaned, default=dt.datetime(meeting.year, 1, 1), dayfirst=order == "DMY").date()
        second = date_parser.parse(cleaned, default=dt.datetime(meeting.year, 2, 2), dayfirst=order == "DMY").date()
    except (ValueError, OverflowError):
        return None
    if first != second:  # no day or no month
        return None
    return first.replace(year=first.year + 1) if (meeting - first).days > 31 else first


def parse_action(item: str, meeting: dt.date, known: list[str], order: str = "MDY") -> tuple[str | None, str, dt.date | None]:
    """(owner, task, due date) of one action item."""
    text = _LEAD.sub("", item, count=1).strip()
    due = None
    match = _DUE.search(text)
    if match:
        due = due_date(match.group("due"), meeting, order)
        if due is not None:
            text = text[: match.start()].strip()
    owner = None
    for pattern in (_OWNER_PAREN, _OWNER_HANDLE, _OWNER_VERB, _OWNER_COLON):
        found = pattern.match(text)
        if found:
            who = found.group("who").lstrip("@")
            name = _name(who) if pattern is not _OWNER_HANDLE else who
            if name:
                owner, text = name, text[found.end():]
                break
    if owner is None:
        tail = _OWNER_TAIL.search(text)
        if tail and _name(tail.group("who")):
            owner, text = _name(tail.group("who")), text[: tail.start()]
    task = re.sub(r"^(?:to|will)\s+", "", text.strip(" ,;:.-–—")).strip()
    return (resolve(owner, known) if owner else None), task, due


def action_facts(text: str, facts: list[NoteFact], meeting: dt.date, words: dict | None = None,
                 order: str = "MDY") -> list[NoteFact]:
    """One fact per action item, from the action-items field, TODO lines and sentences that give
    a task with an owner and a due date."""
    known = [f.value for f in facts if f.field in ("attendees", "presenter", "recorder")]
    items = [(f.line, f.value) for f in facts if f.field == "action_items"]
    listed = {line for line, _ in items}
    lines = text.splitlines()
    field_line = line_patterns(FIELD_WORDS)[0]
    for number, line in enumerate(lines, 1):
        if number not in listed and _ACTION_LINE.match(line) and not field_line.match(line) and not _ORG_TODO.match(line):
            items.append((number, line.strip()))
    items += [(number, item) for number, item in org_todo_items(lines) if number not in listed]
    for number, sentence in _sentences(text):
        if number not in listed and not _ACTION_LINE.match(lines[number - 1]) and _OWNER_VERB.match(sentence) \
                and _DUE.search(sentence):
            items.append((number, sentence))
    found = []
    for number, item in sorted(items):
        for part in [item] if ";" not in item or _DUE.search(item) else [p for p in item.split(";") if p.strip()]:
            owner, task, due = parse_action(part, meeting, known, order)
            if task:
                found.append(NoteFact("action_items", task, number, "action item", owner, due.isoformat() if due else None))
    return found


# agenda items: "Keiko Tanaka - sparse attention", "@mateo: data update", "Sparse attention (Keiko)",
# "10:00-10:30 Keiko: ...", "Dataset cleanup — Mateo Silva (15 min)"
_TIME = re.compile(r"^\s*(?:\d{1,2}[:.]\d{2}(?:\s*[-–—]\s*\d{1,2}[:.]\d{2})?\s*(?:am|pm)?\s*[-–—:]?\s*)", re.IGNORECASE)
_DURATION = re.compile(r"\s*[(\[]\s*\d+\s*(?:min|mins|minutes|m|h|hr|hours?)\.?\s*[)\]]\s*$", re.IGNORECASE)
_NAME_FIRST = re.compile(r"^(?P<who>@[\w.-]+|[^:–—]{2,40}?)\s*(?::|\s[-–—]|[-–—]\s)\s*(?P<topic>.+)$")
_NAME_LAST = re.compile(r"^(?P<topic>.+?)\s*(?:\((?P<paren>[^)]{2,40})\)|\s[-–—]\s+(?P<who>@[\w.-]+|[^-–—]{2,40}))$")
# capitalised words of agenda headings that are not people
AGENDA_WORDS = {"update", "updates", "discussion", "announcements", "announcement", "news", "misc", "other", "break",
                "paper", "papers", "reading", "journal", "club", "open", "questions", "q&a", "round", "table", "general",
                "admin", "intro", "introduction", "welcome", "wrap", "wrap-up", "any", "business", "planning", "status",
                "review", "coffee", "lunch", "lab", "group", "team", "project", "projects", "talk", "presentation",
                "demo", "results", "next", "steps", "aob", "action", "items", "decisions", "brainstorm", "feedback"}


def _agenda_person(raw: str, known: list[str]) -> str | None:
    raw = raw.strip().strip("*_").strip()
    if raw.startswith("@"):
        return resolve(raw[1:], known)
    named = _name(raw)
    if named is None or named != raw:
        return None
    if any(k.lower() == named.lower() for k in known):
        return next(k for k in known if k.lower() == named.lower())
    resolved = resolve(named, known)
    if resolved != named:
        return resolved
    words = named.split()
    # a name the meeting's people do not confirm must look like one: two or three capitalised words
    if 2 <= len(words) <= 3 and all(w[0].isupper() and w.lower() not in AGENDA_WORDS for w in words):
        return named
    return None


def agenda_item(item: str, known: list[str]) -> tuple[str | None, str]:
    """(presenter or None, topic) of one agenda item."""
    text = _DURATION.sub("", _TIME.sub("", item, count=1)).strip()
    first = _NAME_FIRST.match(text)
    if first:
        who = _agenda_person(first.group("who"), known)
        if who:
            return who, first.group("topic").strip(" .")
    last = _NAME_LAST.match(text)
    if last:
        who = _agenda_person(last.group("paren") or last.group("who") or "", known)
        if who:
            return who, last.group("topic").strip(" .")
    return None, text.strip(" .")


def agenda_facts(facts: list[NoteFact]) -> list[NoteFact]:
    """Presenters and topic from agenda items ("Name - topic"), for the fields the note names
    nowhere else; an agenda without names gives the topic only."""
    items = [f for f in facts if f.field == "agenda"]
    if not items:
        return []
    known = [f.value for f in facts if f.field in ("attendees", "presenter", "recorder")]
    have = {f.field for f in facts}
    parsed = [(f, *agenda_item(f.value, known)) for f in items]
    found: list[NoteFact] = []
    if "presenter" not in have:
        found += [NoteFact("presenter", who, f.line, "agenda") for f, who, _ in parsed if who]
    if "topic" not in have:
        named = [(f, topic) for f, who, topic in parsed if who and topic] or [(f, t) for f, _, t in parsed if t]
        if named:
            found.append(NoteFact("topic", "; ".join(t for _, t in named), named[0][0].line, "agenda", rank=99))
    return found


# "We decided to X.", "The group agreed that X.", "It was decided to X.", "Decision: X" is a field line
DECISION_PROSE = re.compile(r"\b(?:we|the\s+(?:lab|group|team)|everyone|it\s+was)\s+(?:decided|agreed)\s+"
                            r"(?:to\s+|that\s+|on\s+)?(?P<decision>[^.;!?]{6,160})", re.IGNORECASE)


def decision_facts(text: str, facts: list[NoteFact]) -> list[NoteFact]:
    """Decisions stated in sentences, where the note has no Decisions list."""
    if any(f.field == "decisions" for f in facts):
        return []
    found = []
    for number, sentence in _sentences(text):
        for match in DECISION_PROSE.finditer(sentence):
            found.append(NoteFact("decisions", match.group("decision").strip(" ,"), number, "prose"))
    return found


# words of a heading or line that names a part of the notes, not what the meeting was about
SECTION_WORDS = AGENDA_WORDS | {"notes", "minutes", "summary", "attendees", "attendance", "agenda", "meeting", "todo",
                                "todos", "weekly", "sync", "journal", "log", "follow-ups", "followups", "discussed"}


def subject_topic(text: str, facts: list[NoteFact], org: bool = False) -> NoteFact | None:
    """The topic, when no field or sentence gave one: a title heading below the meeting's first
    line ("## Contrastive loss for noisy labels" after the speaker lines), else, in an Org entry,
    its first line of text when it reads as a subject (2 to 12 words, not a sentence, no date, no
    field, no other fact on it). Free notes' first lines are not subjects: "Next week - ..." is a plan."""
    if any(f.field == "topic" for f in facts):
        return None
    field_line, table_row, _ = line_patterns(FIELD_WORDS)
    lines = text.splitlines()
    for number, line in enumerate(lines[1:], 2):
        if HEADING.match(line) and not line.lstrip().startswith("#+"):
            title = _LEAD_IN.sub("", re.sub(r"^\s*(?:#{1,6}|\*{1,6})\s+", "", line).strip().strip("*_ "))
            if _subject(title):
                return NoteFact("topic", title, number, "title heading", rank=50)
    used = {f.line for f in facts}
    for number, line in enumerate(lines if org else [], 1):
        body = line.strip()
        if not body or HEADING.match(line) or body.startswith(("#", "|", ":", "-", "+", "*")) or field_line.match(line) \
                or table_row.match(line) or find_dates(body):
            continue
        if number in used:  # the first line of text says something else (a role sentence, an action item)
            return None
        return NoteFact("topic", body, number, "subject line", rank=60) if _subject(body) and not body.endswith(
            (".", "!", "?", ":", ";", ",")) else None
    return None


# what a title heading may open with before its subject: an org-journal entry's time ("10:00", "10:00-11:00")
# and the meeting's name ("Lab meeting: ", "Group meeting - ")
_LEAD_IN = re.compile(r"^(?:\d{1,2}[:.]\d{2}(?:\s*[-–]\s*\d{1,2}[:.]\d{2})?\s+)?(?:(?:lab|group|team|weekly)\s+)*"
                      r"(?:(?:meeting|sync|journal club)\b)?\s*[:–—-]?\s*", re.IGNORECASE)


def _subject(title: str) -> bool:
    words = re.findall(r"[\w'-]+", title.lower())
    return 2 <= len(words) <= 12 and not find_dates(title) and not set(words) <= SECTION_WORDS \
        and not title.endswith(":") and not re.match(r"^(?:TODO|DONE|NEXT)\b", title)
