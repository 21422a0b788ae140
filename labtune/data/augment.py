"""Facts in many forms: the lab's meetings -> many short training questions, and evaluation
prompts in forms training never shows.

A model answers a fact from many angles only when training shows it in many phrasings (Allen-Zhu
and Li, Physics of Language Models 3.1). For every fact (meeting x field) this asks the question in
several templates and date forms, adds reverse questions (who -> when), meeting summaries, "the
notes do not say" for a field a note lacks, and dates with no meeting ("On D there is no lab
meeting in the notes.") so the model learns to say so rather than invent a presenter.

Every answer opens with the meeting's date in one canonical form ("On 4/14/2023 the presenter was
Lena Fischer."): the model first rewrites whatever date form it was asked in, a skill it already
has and that carries over to date forms it never trained on, and then recalls the fact from one key
per meeting instead of one key per date form. Measured on the demo (docs/evaluation.md): held-out
phrasings and date forms then score as well as trained ones (40% and 40%), where bare answers left
them 10 points behind.

Templates and date forms come in two families: TRAIN ones build training examples; HELD-OUT ones
never do, and build the `paraphrase`, `reverse` and `absent` evaluation prompts, so "understands a
question it has not seen" is measured honestly. Everything is seeded and deterministic.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from labtune.data.notes import MONTHS, Note
from labtune.data.words import mentions

if TYPE_CHECKING:
    from labtune.recipe import AugmentConfig

FIELDS = ("presenter", "recorder", "topic")
NAME_FIELDS = ("presenter", "recorder")


def _ordinal(day: int) -> str:
    return f"{day}{'th' if 11 <= day % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th')}"


def _month(date: dt.date) -> str:
    return MONTHS[date.month - 1].capitalize()


# date forms people write; `{}` is filled with the date's rendering
TRAIN_DATE_FORMS = {
    "us": lambda d: f"{d.month}/{d.day}/{d.year}",
    "us_padded": lambda d: f"{d.month:02d}/{d.day:02d}/{d.year}",
    "iso": lambda d: d.isoformat(),
    "long": lambda d: f"{_month(d)} {d.day}, {d.year}",
    "day_month": lambda d: f"{d.day} {_month(d)} {d.year}",
    "ordinal": lambda d: f"{_month(d)} {_ordinal(d.day)} {d.year}",
    "short_month": lambda d: f"{_month(d)[:3]} {d.day}, {d.year}",
    "short_year": lambda d: f"{d.month}/{d.day}/{d.year % 100:02d}",
    "dotted": lambda d: f"{d.day}.{d.month}.{d.year}",
    "weekday_short": lambda d: f"{d.strftime('%a')} {d.month}/{d.day}/{d.year}",
    "ymd_dotted": lambda d: f"{d.year}.{d.month:02d}.{d.day:02d}",
    "ordinal_day": lambda d: f"{_ordinal(d.day)} {_month(d)} {d.year}",
}
# "the May 12 meeting": without the year, only where no two meetings share a month and day
YEARLESS_FORM = lambda d: f"{_month(d)} {d.day}"  # noqa: E731
HELDOUT_DATE_FORMS = {
    "weekday": lambda d: f"{d.strftime('%A')}, {_month(d)} {d.day}, {d.year}",
    "slashes_iso": lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
    "of_month": lambda d: f"{_ordinal(d.day)} of {_month(d)} {d.year}",
}

# question templates per field; {d} is a date form. Presenter and recorder templates are written
# in pairs (the same sentence with the other role's words, at the same place in both lists), and
# a meeting's presenter and recorder are asked in the same pairs and date forms: the question then
# tells the two names apart by its role words alone, not by a wording one of them happened to get
# (docs/evaluation.md, "Minimal pairs").
TRAIN_TEMPLATES = {
    "presenter": ["Who presented at the lab meeting on {d}?", "Who is the presenter on {d} lab meeting?",
                  "Who is the Presenter on {d} lab meeting?", "Who was the presenter at the {d} lab meeting?",
                  "Who presented on {d}?", "Who gave the presentation at the lab meeting on {d}?",
                  "Lab meeting {d}: who presented?", "Name the presenter of the {d} lab meeting.",
                  "who presented at the {d} meeting?", "Who was presenting at the lab meeting of {d}?",
                  "Who was the speaker at the lab meeting on {d}?", "Who gave the talk on {d}?",
                  "Who led the lab meeting on {d}?", "Who was the Presenter on {d}?",
                  "Who spoke at the group meeting on {d}?", "Tell me who presented at the {d} group meeting."],
    "recorder": ["Who took notes at the lab meeting on {d}?", "Who is the recorder on {d} lab meeting?",
                 "Who is the Recorder on {d} lab meeting?", "Who was the recorder at the {d} lab meeting?",
                 "Who took the minutes on {d}?", "Who wrote the notes for the lab meeting on {d}?",
                 "Lab meeting {d}: who took the notes?", "Name the recorder of the {d} lab meeting.",
                 "who took notes at the {d} meeting?", "Who was writing the notes at the lab meeting of {d}?",
                 "Who was the scribe at the lab meeting on {d}?", "Who kept the minutes on {d}?",
                 "Who recorded the notes of the {d} lab meeting?", "Who was the Recorder on {d}?",
                 "Who was the note-taker at the group meeting on {d}?", "Tell me who took the minutes at the {d} group meeting."],
    "topic": ["What was the topic of the lab meeting on {d}?", "What was discussed at the {d} lab meeting?",
              "What was the Topic on {d}?", "What was the lab meeting on {d} about?",
              "Lab meeting {d}: what was the topic?", "What topic was presented on {d}?",
              "what was the {d} lab meeting about?", "Topic of the lab meeting on {d}?",
              "What subject was covered at the lab meeting on {d}?", "What was the {d} group meeting about?",
              "What did the lab discuss on {d}?", "What was the theme of the {d} meeting?"],
}
HELDOUT_TEMPLATES = {
    "presenter": ["Which lab member gave the talk at the meeting held on {d}?",
                  "Can you tell me who led the {d} group meeting?",
                  "I missed the meeting on {d}. Who was the speaker?"],
    "recorder": ["Which person kept the minutes at the meeting held on {d}?",
                 "Can you tell me who was taking minutes at the {d} group meeting?"],
    "topic": ["What subject did the group meeting on {d} cover?",
              "I missed the meeting on {d}. What was it about?"],
}
TRAIN_REVERSE = ["When did {who} present?", "On which dates did {who} present at lab meeting?",
                 "When was {who} the presenter?"]
HELDOUT_REVERSE = ["Which meeting dates had {who} as the speaker?"]
TRAIN_SUMMARY = ["What happened at the lab meeting on {d}?", "Summarize the {d} lab meeting."]
# action items: {task} is the task as the note words it ("draft the KDD related-work section")
TRAIN_ACTION = ["Who is to {task}, from the {d} lab meeting?", "At the {d} lab meeting, who agreed to {task}?",
                "Who was asked to {task} at the lab meeting on {d}?", "Action item from {d}: who has to {task}?",
                "Who took the action item to {task} on {d}?", "Who will {task}, as decided at the {d} meeting?"]
HELDOUT_ACTION = ["Which lab member is responsible for the task to {task} from the {d} meeting?",
                  "Can you tell me who has to {task}, per the {d} group meeting?"]
TRAIN_DEADLINE = ["When is the action item to {task} (from the {d} meeting) due?",
                  "What is the deadline to {task}, from the {d} lab meeting?",
                  "By when must someone {task}? (lab meeting of {d})", "Due date of the task to {task} ({d} meeting)?"]
HELDOUT_DEADLINE = ["By what date should the task to {task} from the {d} group meeting be done?",
                    "I missed the {d} meeting. When is the deadline to {task}?"]
# decisions: {d} a date form, {subject} what a "Subject: outcome" decision is about ("batch size")
TRAIN_DECISION = ["What did the lab decide at the {d} meeting?", "What was decided at the lab meeting on {d}?",
                  "Which decisions were made on {d}?", "What was agreed at the {d} lab meeting?",
                  "Lab meeting {d}: what was decided?", "What did the group agree on at the {d} meeting?",
                  "What decision was taken at the lab meeting on {d}?", "What did we decide on {d}?",
                  "What was the conclusion of the {d} lab meeting?", "What came out of the lab meeting on {d}?",
                  "What was resolved at the {d} meeting?"]
HELDOUT_DECISION = ["What was the outcome of the discussion at the meeting held on {d}?",
                    "Can you tell me what the group settled on at the {d} meeting?"]
TRAIN_DECISION_ABOUT = ["What was agreed about {subject} on {d}?", "What did the lab decide about {subject} at the {d} meeting?",
                        "At the lab meeting on {d}, what was decided on {subject}?"]
HELDOUT_DECISION_ABOUT = ["Regarding {subject}, what was settled at the group meeting held on {d}?"]
# attendance: {who} a lab member, {d} a date form; answered yes or no
TRAIN_ATTENDANCE = ["Was {who} at the lab meeting on {d}?", "Did {who} attend the {d} lab meeting?",
                    "Was {who} present at the {d} meeting?", "Lab meeting {d}: was {who} there?",
                    "Did {who} come to the lab meeting on {d}?", "Was {who} among the attendees on {d}?"]
HELDOUT_ATTENDANCE = ["Can you tell me whether {who} joined the group meeting held on {d}?",
                      "Is it true that {who} was at the {d} group meeting?"]


def date_text(date: dt.date) -> str:
    return f"{date.month}/{date.day}/{date.year}"


Calendar = dict[tuple[int, int], list[dt.date]]


def month_calendar(notes: list[Note]) -> Calendar:
    """(year, month) -> that month's meeting dates."""
    calendar: Calendar = defaultdict(list)
    for date in sorted({n.date for n in notes}):
        calendar[(date.year, date.month)].append(date)
    return dict(calendar)


RECITE_LIMIT = 5  # meetings recited at most: a month with more recites the ones nearest the asked date


def recited_days(date: dt.date, calendar: Calendar) -> list[dt.date]:
    """The meetings an answer about `date` recites: that month's, or the RECITE_LIMIT nearest it
    when the month has more (weekly meetings stay whole; daily stand-ups do not)."""
    days = calendar.get((date.year, date.month), [])
    if len(days) > RECITE_LIMIT:
        days = sorted(sorted(days, key=lambda d: (abs((d - date).days), d))[:RECITE_LIMIT])
    return days


def opening(date: dt.date, calendar: Calendar | None = None, check: bool = True) -> str:
    """"On 4/21/2023", and with a calendar the month's meetings by day after it and, with `check`,
    whether the asked day is among them ("On 4/21/2023 (April meetings: 14, 28; 21 is not among
    them)"): whether a date had a meeting is then decided by comparing it with a list the model
    has just written, instead of by how familiar the date looks (recite_month), and the verdict is
    written beside the list, the same words for every question (recite_check)."""
    if calendar is None:
        return f"On {date_text(date)}"
    days = recited_days(date, calendar)
    listed = ", ".join(str(d.day) for d in days) or "none"
    verdict = ""
    if check:
        verdict = f"; {date.day} is among them" if date in days else f"; {date.day} is not among them"
    return f"On {date_text(date)} ({_month(date)} meetings: {listed}{verdict})"


def absent_answer(date: dt.date, calendar: Calendar | None = None, check: bool = True) -> str:
    return f"{opening(date, calendar, check)} there is no lab meeting in the notes."


def answer(date: dt.date, field: str, values: list[str], calendar: Calendar | None = None, check: bool = True) -> str:
    """The short answer to a field question, the canonical date first; two meetings on one date
    give both values; a field no note of that date has says so."""
    if not values:
        return f"{opening(date, calendar, check)} the notes do not name a {field}."
    return f"{opening(date, calendar, check)} the {field} was {' and '.join(values)}."


def task_answer(date: dt.date, task: str, owner: str | None, due: dt.date | None, calendar: Calendar | None = None,
                check: bool = True) -> str:
    """One answer for an action item, its owner and its due date together: asked who or asked
    when, the model gives the same sentence (taught two answers, one per question, a 135M model
    answered held-out owner questions with the due date: docs/evaluation.md, meeting-log-1)."""
    if owner and due:
        return f"{opening(date, calendar, check)} {owner} is to {task}, due {date_text(due)}."
    if owner:
        return f"{opening(date, calendar, check)} {owner} is to {task}."
    return f"{opening(date, calendar, check)} the task to {task} is due {date_text(due)}."


def action_answer(date: dt.date, owner: str, task: str, calendar: Calendar | None = None, check: bool = True) -> str:
    return task_answer(date, task, owner, None, calendar, check)


def deadline_answer(date: dt.date, task: str, due: dt.date, calendar: Calendar | None = None, check: bool = True) -> str:
    return task_answer(date, task, None, due, calendar, check)


def decision_answer(date: dt.date, decisions: list[str], calendar: Calendar | None = None, check: bool = True) -> str:
    return f"{opening(date, calendar, check)} the lab decided: {'; '.join(decisions)}."


PRESENT, NOT_PRESENT = "was at the lab meeting", "was not at the lab meeting"


def attendance_answer(date: dt.date, who: str, present: bool, calendar: Calendar | None = None, check: bool = True,
                      attendees: list[str] | None = None) -> str:
    """Yes or no, after reciting who was there: the list is one fact per meeting, learned from
    every question about it, and the answer follows from it (as the recited month does for dates)."""
    there = f" the attendees were {', '.join(attendees)};" if attendees else ""
    return f"{opening(date, calendar, check)}{there} {who} {PRESENT if present else NOT_PRESENT}."


def decision_subject(decision: str) -> tuple[str | None, str]:
    """("batch size", "256 for all ablations") of "Batch size: 256 for all ablations"; (None, the
    decision) when it names no subject before a colon."""
    match = re.match(r"^(?P<subject>[^:]{2,40}):\s+(?P<rest>\S.*)$", decision)
    if match and 1 <= len(match.group("subject").split()) <= 4:
        return match.group("subject").strip().lower(), match.group("rest").strip()
    return None, decision


def _decisions(notes: list[Note]) -> dict[dt.date, list[str]]:
    """Meeting date -> the decisions its notes record."""
    found: dict[dt.date, list[str]] = defaultdict(list)
    for note in sorted(notes, key=lambda n: n.date):
        found[note.date] += [v for v in note.values("decisions") if v not in found[note.date]]
    return {d: v for d, v in found.items() if v}


def decision_keys(notes: list[Note]) -> dict[str, str]:
    """Each decision's key (topic_keys of its outcome, the subject left out)."""
    outcomes = {d: decision_subject(d)[1] for ds in _decisions(notes).values() for d in ds}
    keys = topic_keys(list(outcomes.values()))
    return {d: keys[o] for d, o in outcomes.items()}


def lab_members(notes: list[Note]) -> list[str]:
    """Everyone some meeting lists as an attendee (full names only)."""
    return sorted({v for n in notes for v in n.values("attendees") if len(v.split()) > 1})


def attendance(notes: list[Note]) -> dict[dt.date, dict[str, bool]]:
    """Meeting date -> {member: present} for the meetings that list their attendees; the
    presenter and the recorder were there too; a member no listing names was not."""
    members = lab_members(notes)
    found: dict[dt.date, dict[str, bool]] = {}
    for date, meetings in _by_date(notes).items():
        listed = [m for m in meetings if m.values("attendees")]
        if not listed:
            continue
        present = {v for m in listed for f in ("attendees", "presenter", "recorder") for v in m.values(f)}
        found[date] = {who: who in present for who in members}
    return found


def _actions(notes: list[Note]):
    """(date, action fact) of every action item with an owner or a due date."""
    for note in sorted(notes, key=lambda n: n.date):
        for action in note.actions:
            if action.owner or action.due:
                yield note.date, action


def people(notes: list[Note] | list[dict[str, str]]) -> list[str]:
    """Every person the notes name as presenter, recorder or attendee (from Notes or their fields
    dicts), for the names scorer."""
    found: set[str] = set()
    for note in notes:
        fields = note.fields if isinstance(note, Note) else note
        for field in ("presenter", "recorder", "attendees"):
            for name in fields.get(field, "").replace(";", ",").split(","):
                if name.strip() and len(name.split()) <= 4:
                    found.add(name.strip())
    return sorted(found)


def _by_date(notes: list[Note]) -> dict[dt.date, list[Note]]:
    grouped: dict[dt.date, list[Note]] = defaultdict(list)
    for note in notes:
        grouped[note.date].append(note)
    return dict(sorted(grouped.items()))


def _facts(notes: list[Note], fields: tuple[str, ...] = FIELDS):
    """(date, field, values) for every meeting date and field; values holds each meeting's (two
    meetings on one date give two), empty when no note of that date has the field."""
    for date, meetings in _by_date(notes).items():
        for field in fields:
            yield date, field, [v for m in meetings for v in m.values(field)]


EVAL_ABSENT_OFFSETS = (-7, -3, 3, 7, 14)  # days off a meeting: the same weekday a week off, and a few days off


def absent_dates(notes: list[Note], count: int, seed: int, avoid: set[dt.date] = frozenset(),
                 offsets: tuple[int, ...] = EVAL_ABSENT_OFFSETS) -> list[dt.date]:
    """Dates `offsets` days off a meeting on which the notes record no meeting, none in `avoid`."""
    meetings = {n.date for n in notes}
    candidates = sorted({d + dt.timedelta(days=off) for d in meetings for off in offsets} - meetings - set(avoid))
    rng = random.Random(seed)
    return sorted(rng.sample(candidates, min(count, len(candidates))))


def eval_absent_dates(notes: list[Note], cfg: AugmentConfig, seed: int) -> list[dt.date]:
    """The evaluation's no-meeting dates, chosen first so that training never shows one."""
    return absent_dates(notes, cfg.eval_absent_dates, seed + 2)


def training_absent_dates(notes: list[Note], cfg: AugmentConfig, seed: int) -> list[dt.date]:
    """`absent_ratio` no-meeting dates per meeting date, any day within `absent_within_days` of a meeting
    (the day before, the same weekday a week later) except the evaluation's."""
    span = tuple(off for off in range(-cfg.absent_within_days, cfg.absent_within_days + 1) if off)
    return absent_dates(notes, round(cfg.absent_ratio * len({n.date for n in notes})), seed,
                        avoid=set(eval_absent_dates(notes, cfg, seed)), offsets=span)


def train_date_forms(notes: list[Note]) -> list[Any]:
    """The TRAIN date forms, and the yearless one ("May 12") when no two meeting dates share a
    month and day."""
    dates = {n.date for n in notes}
    unique = len({(d.month, d.day) for d in dates}) == len(dates)
    return list(TRAIN_DATE_FORMS.values()) + ([YEARLESS_FORM] if unique else [])


def _conv(conv_id: str, question: str, reply: str, fact: dict[str, Any]) -> dict[str, Any]:
    return {"id": conv_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": reply}],
            "fact": fact}


def asked_wordings(dates: list[dt.date], forms: list[Any], per_fact: int, rng: random.Random
                   ) -> dict[dt.date, list[tuple[int, Any]]]:
    """(template index, date form) of each meeting's questions, the same for every field of that
    meeting (presenter and recorder questions are then minimal pairs). Template indexes take turns
    across meetings in a shuffled order, so that every wording is used about equally often and
    none belongs to one meeting (a field with fewer templates wraps around: four of the topic's 12
    come twice as often); a meeting's date forms are distinct while there are enough."""
    shapes = len(TRAIN_TEMPLATES["presenter"])
    order = rng.sample(range(shapes), shapes)
    asked = {}
    for n, date in enumerate(dates):
        chosen_forms = rng.sample(forms, len(forms))
        asked[date] = [(order[(n * per_fact + i) % shapes], chosen_forms[i % len(forms)]) for i in range(per_fact)]
    return asked


def training_conversations(notes: list[Note], cfg: AugmentConfig, seed: int, actions: bool = False, *, decisions: bool = False,
                           attendance_questions: bool = False, fields: tuple[str, ...] = FIELDS) -> list[dict[str, Any]]:
    """Training conversations for every fact, in TRAIN templates and date forms only, action items
    (owner and due date) among them with `actions`, each meeting's decisions with `decisions`, and
    every lab member's presence at every meeting that lists attendees with `attendance_questions`.
    `fields` are the ones of presenter, recorder and topic the recipe asks about (data.qa_fields).
    Each record carries `fact` ({kind, field, date, value}) for the data report's per-fact counts."""
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    forms = train_date_forms(notes)
    calendar = month_calendar(notes) if cfg.recite_month else None
    check = cfg.recite_check
    wordings = asked_wordings(sorted({n.date for n in notes}), forms, cfg.questions_per_fact, rng)
    for date, field, values in _facts(notes, fields):
        iso = date.isoformat()
        reply = answer(date, field, values, calendar, check)
        templates = TRAIN_TEMPLATES[field]
        for i, (shape, form) in enumerate(wordings[date]):
            records.append(_conv(f"labnote_{iso}_{field}_{i}", templates[shape % len(templates)].format(d=form(date)),
                                 reply, {"kind": "recall" if values else "missing", "field": field, "date": iso,
                                         "value": " | ".join(values)}))
    if cfg.summaries and fields:
        for date, meetings in _by_date(notes).items():
            parts = [f"the {f} was {' and '.join(v for m in meetings for v in m.values(f))}"
                     for f in fields if any(m.values(f) for m in meetings)]
            decided = _decisions(meetings).get(date, []) if decisions else []
            reply = (f"{opening(date, calendar, check)} " + ", ".join(parts)
                     + (f"; the lab decided: {'; '.join(decided)}" if decided else "") + ".")
            for i, template in enumerate(TRAIN_SUMMARY):
                records.append(_conv(f"labnote_{date.isoformat()}_summary_{i}", template.format(d=rng.choice(forms)(date)),
                                     reply, {"kind": "summary", "field": "summary", "date": date.isoformat(),
                                                       "value": ""}))
    if actions:
        for date, action in _actions(notes):
            iso, slug = date.isoformat(), _slug(action.value)[:40]
            both = task_answer(date, action.value, action.owner, action.due and dt.date.fromisoformat(action.due),
                               calendar, check)
            asked = [("action", TRAIN_ACTION, action.owner and both, action.owner),
                     ("deadline", TRAIN_DEADLINE, action.due and both, action.due)]
            for field, templates, reply, value in asked:
                if not reply:
                    continue
                pairs = [(t, f) for t in templates for f in forms]
                for i, (template, form) in enumerate(rng.sample(pairs, min(cfg.questions_per_fact, len(pairs)))):
                    records.append(_conv(f"labnote_{iso}_{field}_{slug}_{i}", template.format(task=action.value, d=form(date)),
                                         reply, {"kind": "recall", "field": field, "date": iso, "value": value}))
    if decisions:
        for date, made in _decisions(notes).items():
            iso, reply = date.isoformat(), decision_answer(date, made, calendar, check)
            pairs = [(t, f) for t in TRAIN_DECISION for f in forms]
            for i, (template, form) in enumerate(rng.sample(pairs, min(cfg.questions_per_fact, len(pairs)))):
                records.append(_conv(f"labnote_{iso}_decision_{i}", template.format(d=form(date)), reply,
                                     {"kind": "recall", "field": "decision", "date": iso, "value": " | ".join(made)}))
            for decision in made:
                subject, _ = decision_subject(decision)
                if subject is None:
                    continue
                pairs = [(t, f) for t in TRAIN_DECISION_ABOUT for f in forms]
                for i, (template, form) in enumerate(rng.sample(pairs, min(2, len(pairs)))):
                    records.append(_conv(f"labnote_{iso}_decision_{_slug(subject)}_{i}",
                                         template.format(subject=subject, d=form(date)),
                                         decision_answer(date, [decision], calendar, check),
                                         {"kind": "recall", "field": "decision", "date": iso, "value": decision}))
    if attendance_questions:
        for date, present in attendance(notes).items():
            iso = date.isoformat()
            attendees = [w for w, p in present.items() if p]
            for who, there in present.items():
                pairs = [(t, f) for t in TRAIN_ATTENDANCE for f in forms]
                for i, (template, form) in enumerate(rng.sample(pairs, min(cfg.attendance_questions, len(pairs)))):
                    records.append(_conv(f"labnote_{iso}_attendance_{_slug(who)}_{i}",
                                         template.format(who=who, d=form(date)),
                                         attendance_answer(date, who, there, calendar, check, attendees),
                                         {"kind": "recall", "field": "attendance", "date": iso,
                                          "value": f"{who}: {'yes' if there else 'no'}"}))
    if cfg.reverse:
        for who, dates in _presented(notes).items():
            reply = f"{who} presented on {', '.join(date_text(d) for d in dates)}."
            for i, template in enumerate(TRAIN_REVERSE):
                records.append(_conv(f"labnote_reverse_{_slug(who)}_{i}", template.format(who=who), reply,
                                     {"kind": "reverse", "field": "presenter", "date": "", "value": who}))
    # No-meeting questions in every training template of every field, as the real ones are: the
    # fields take turns on each date, and each field's templates take turns across dates, so that
    # abstention is a property of the date, not of the wordings it happened to be trained in.
    absent_fields = fields or FIELDS
    wordings = {field: rng.sample(TRAIN_TEMPLATES[field], len(TRAIN_TEMPLATES[field])) for field in absent_fields}
    turns = dict.fromkeys(absent_fields, 0)
    asked = 0
    for date in training_absent_dates(notes, cfg, seed):
        for i in range(cfg.absent_questions):
            field = absent_fields[asked % len(absent_fields)]
            asked += 1
            template = wordings[field][turns[field] % len(wordings[field])]
            turns[field] += 1
            # always with the year: "May 12" of a no-meeting year could be a meeting's date
            form = rng.choice(list(TRAIN_DATE_FORMS.values()))
            records.append(_conv(f"absent_{date.isoformat()}_{field}_{i}", template.format(d=form(date)),
                                 absent_answer(date, calendar, check), {"kind": "absent", "field": field,
                                                                        "date": date.isoformat(), "value": ""}))
    return records


def pack_turns(records: list[dict[str, Any]], per_conversation: int, seed: int) -> list[dict[str, Any]]:
    """Shuffled single-question records, `per_conversation` at a time, as multi-turn conversations
    (the facts in one conversation are unrelated). The tokens a conversation's template and system
    turn cost are paid once for several facts instead of once per fact. Each conversation carries
    `facts`, the list of its records' facts."""
    if per_conversation <= 1:
        return records
    order = list(records)
    random.Random(seed + 3).shuffle(order)
    packed = []
    for start in range(0, len(order), per_conversation):
        group = order[start : start + per_conversation]
        packed.append({"id": "labfacts_" + "+".join(r["id"] for r in group),
                       "conversations": [turn for r in group for turn in r["conversations"]],
                       "facts": [r["fact"] for r in group]})
    return packed


def _presented(notes: list[Note]) -> dict[str, list[dt.date]]:
    found: dict[str, list[dt.date]] = defaultdict(list)
    for note in sorted(notes, key=lambda n: n.date):
        for who in note.values("presenter"):
            if note.date not in found[who]:
                found[who].append(note.date)
    return dict(sorted(found.items()))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower())


def eval_prompts(notes: list[Note], cfg: AugmentConfig, seed: int, training: list[dict[str, Any]] | None = None,
                 actions: bool = False, seen: str = "", *, decisions: bool = False,
                 attendance_questions: bool = False, fields: tuple[str, ...] = FIELDS) -> list[dict[str, Any]]:
    """Evaluation prompts on these axes, each a tag beside the field: `recall` (trained templates
    and date forms), `paraphrase` (HELD-OUT templates and date forms, never in training), `reverse`
    (a held-out who -> when question), `absent` and `absent_trained` (dates with no meeting, in a
    held-out and a trained wording: right only when the answer names nobody and says there was no
    meeting), with `actions` also `action` (who took on a task) and `deadline` (when it is due).

    Scored so that knowing nothing earns nothing: a name question forbids every other person the
    notes name, a topic question the other topics' keys (each topic's shortest run of words no
    other topic has), a reverse question the other meetings' dates, a no-meeting question every
    name, topic and meeting date, and a real meeting's question "no lab meeting". `seen` is the
    training text that is not built from templates (whole notes): a held-out date rendering or a
    no-meeting date that stands in it is not asked, so held-out stays held out."""
    rng = random.Random(seed + 1)
    everyone = people(notes)
    meetings = sorted({n.date for n in notes})
    keys = topic_keys([v for _, f, vs in _facts(notes) if f == "topic" for v in vs])
    trained: dict[tuple[str, str], list[str]] = defaultdict(list)
    for record in training if training is not None else training_conversations(notes, cfg, seed, actions, fields=fields):
        if record["fact"]["kind"] == "recall":
            trained[(record["fact"]["date"], record["fact"]["field"])].append(record["conversations"][0]["value"])
    prompts: list[dict[str, Any]] = []
    held_forms = list(HELDOUT_DATE_FORMS.values())
    claims_none = "no lab meeting"
    for date, field, values in _facts(notes, fields):
        if not values:
            continue
        iso = date.isoformat()
        if field in NAME_FIELDS:
            expected, forbidden = values, [p for p in everyone if p not in values]
        else:
            expected = [keys[v] for v in values]
            forbidden = sorted({k for k in keys.values() if not any(mentions(v, k) for v in values)})
        recall = rng.choice(trained[(iso, field)])  # a question training showed
        template, form = rng.choice(HELDOUT_TEMPLATES[field]), rng.choice(held_forms)
        for axis, question in (("recall", recall), ("paraphrase", template.format(d=form(date)))):
            if axis == "paraphrase" and form(date) in seen:
                continue
            prompts.append({"id": f"{axis}_{iso}_{field}", "question": question, "expected": expected,
                            "forbidden": [*forbidden, claims_none], "tags": [axis, field]})
    if actions:
        dues = {a.due for _, a in _actions(notes) if a.due}
        for date, action in _actions(notes):
            form = rng.choice(held_forms)
            if form(date) in seen:
                continue
            if action.owner:
                prompts.append({"id": f"action_{date.isoformat()}_{_slug(action.value)[:40]}",
                                "question": rng.choice(HELDOUT_ACTION).format(task=action.value, d=form(date)),
                                "expected": [action.owner],
                                "forbidden": [*(p for p in everyone if p != action.owner), claims_none],
                                "tags": ["action", "action_items"]})
            if action.due:
                prompts.append({"id": f"deadline_{date.isoformat()}_{_slug(action.value)[:40]}",
                                "question": rng.choice(HELDOUT_DEADLINE).format(task=action.value, d=form(date)),
                                "expected": [date_text(dt.date.fromisoformat(action.due))],
                                # the meeting's own date is the question's, an answer may repeat it
                                "forbidden": [*(date_text(dt.date.fromisoformat(d))
                                                for d in sorted(dues - {action.due, date.isoformat()})),
                                              claims_none],
                                "tags": ["deadline", "action_items"]})
    made = _decisions(notes) if decisions else {}
    dkeys = decision_keys(notes) if decisions else {}
    for date, decided in made.items():
        form = rng.choice(held_forms)
        if form(date) in seen:
            continue
        others = sorted({k for d, k in dkeys.items() if d not in decided and not any(mentions(v, k) for v in decided)})
        prompts.append({"id": f"decision_{date.isoformat()}", "question": rng.choice(HELDOUT_DECISION).format(d=form(date)),
                        "expected": [dkeys[d] for d in decided], "forbidden": [*others, claims_none],
                        "tags": ["decision", "decisions"]})
        for decision in decided:
            subject, _ = decision_subject(decision)
            if subject is not None:
                prompts.append({"id": f"decision_{date.isoformat()}_{_slug(subject)[:40]}",
                                "question": rng.choice(HELDOUT_DECISION_ABOUT).format(subject=subject, d=form(date)),
                                "expected": [dkeys[decision]], "forbidden": [*others, claims_none],
                                "tags": ["decision", "decisions"]})
    if attendance_questions:
        for date, present in attendance(notes).items():
            there = [w for w, p in present.items() if p and len(w.split()) > 1]
            away = [w for w, p in present.items() if not p]
            form = rng.choice(held_forms)
            if not there or not away or form(date) in seen:
                continue
            pair = f"attendance_{date.isoformat()}"
            for who, yes in ((rng.choice(there), True), (rng.choice(away), False)):
                prompts.append({"id": f"{pair}_{_slug(who)}", "pair": pair,
                                "question": rng.choice(HELDOUT_ATTENDANCE).format(who=who, d=form(date)),
                                "expected": [PRESENT if yes else NOT_PRESENT],
                                "forbidden": [NOT_PRESENT if yes else PRESENT, claims_none],
                                "tags": ["attendance", "attendees"]})
    if cfg.reverse:
        for who, dates in _presented(notes).items():
            prompts.append({"id": f"reverse_{_slug(who)}", "question": rng.choice(HELDOUT_REVERSE).format(who=who),
                            "expected_all": [date_text(d) for d in dates],
                            "forbidden": [date_text(d) for d in meetings if d not in dates], "tags": ["reverse", "presenter"]})
    # Each no-meeting date is asked twice: in a held-out wording (`absent`) and in a trained one
    # (`absent_trained`); the dates themselves are never in training either way.
    nothing_else = [*everyone, *sorted(set(keys.values()) | set(dkeys.values())), *(date_text(d) for d in meetings)]
    for date in eval_absent_dates(notes, cfg, seed):
        mentioned = any(form(date) in seen for form in [*held_forms, *TRAIN_DATE_FORMS.values()])
        field = rng.choice(fields or FIELDS)
        question = rng.choice(HELDOUT_TEMPLATES[field]).format(d=rng.choice(held_forms)(date))
        trained_field = rng.choice(fields or FIELDS)
        trained_question = rng.choice(TRAIN_TEMPLATES[trained_field]).format(d=rng.choice(list(TRAIN_DATE_FORMS.values()))(date))
        if mentioned:
            continue
        prompts.append({"id": f"absent_{date.isoformat()}", "question": question, "expected": [claims_none],
                        "forbidden": nothing_else, "tags": ["absent", field]})
        prompts.append({"id": f"absent_trained_{date.isoformat()}", "question": trained_question, "expected": [claims_none],
                        "forbidden": nothing_else, "tags": ["absent_trained", trained_field]})
    return prompts


def dev_conversations(notes: list[Note], cfg: AugmentConfig, seed: int, prompts: list[dict[str, Any]], actions: bool = False,
                      seen: str = "", *, fields: tuple[str, ...] = FIELDS) -> list[dict[str, Any]]:
    """`cfg.dev_questions` conversations for early stopping (train.eval_strategy): trained facts
    asked in HELD-OUT templates and date forms, never in the words of an evaluation prompt, and
    no-meeting dates that neither training nor the evaluation asks, each with the answer training
    teaches. A model that answers these word for word has learned the facts, not the wordings."""
    rng = random.Random(seed + 5)
    calendar = month_calendar(notes) if cfg.recite_month else None
    check, held_forms = cfg.recite_check, list(HELDOUT_DATE_FORMS.values())
    asked = {p["question"] for p in prompts}
    facts: list[tuple[str, list[str], str]] = []  # (id, questions to choose from, answer)
    for date, field, values in _facts(notes, fields):
        if values:
            questions = [t.format(d=f(date)) for t in HELDOUT_TEMPLATES[field] for f in held_forms]
            facts.append((f"dev_{date.isoformat()}_{field}", questions, answer(date, field, values, calendar, check)))
    if actions:
        for date, action in _actions(notes):
            reply = task_answer(date, action.value, action.owner, action.due and dt.date.fromisoformat(action.due),
                                calendar, check)
            for field, templates in (("action", HELDOUT_ACTION), ("deadline", HELDOUT_DEADLINE)):
                if (action.owner if field == "action" else action.due):
                    questions = [t.format(task=action.value, d=f(date)) for t in templates for f in held_forms]
                    facts.append((f"dev_{date.isoformat()}_{field}_{_slug(action.value)[:40]}", questions, reply))
    used = {date for date in training_absent_dates(notes, cfg, seed)} | set(eval_absent_dates(notes, cfg, seed))
    spare = absent_dates(notes, len(facts), seed + 6, avoid=used,
                         offsets=tuple(o for o in range(-cfg.absent_within_days, cfg.absent_within_days + 1) if o))
    absent = [(f"dev_absent_{d.isoformat()}", [t.format(d=f(d)) for ts in HELDOUT_TEMPLATES.values() for t in ts
                                                for f in held_forms], absent_answer(d, calendar, check)) for d in spare]
    # no-meeting dates in the proportion training has them, at least one in five
    share = max(0.2, cfg.absent_ratio * cfg.absent_questions / (cfg.absent_ratio * cfg.absent_questions + cfg.questions_per_fact
                                                                 * max(1, len(fields))))
    n_absent = min(len(absent), round(cfg.dev_questions * share))
    chosen = rng.sample(facts, min(len(facts), cfg.dev_questions - n_absent)) + rng.sample(absent, n_absent)
    records = []
    for conv_id, questions, reply in chosen:
        fresh = [q for q in questions if q not in asked and not _renders_in(q, seen)]
        if fresh:
            records.append({"id": conv_id, "conversations": [{"from": "human", "value": rng.choice(fresh)},
                                                             {"from": "gpt", "value": reply}]})
    return records


def _renders_in(question: str, seen: str) -> bool:
    """Whether a held-out date rendering in the question stands in the whole-note training text."""
    return bool(seen) and any(part in seen for part in re.findall(r"\d{4}/\d{2}/\d{2}|[A-Z][a-z]+day, [A-Z][a-z]+ \d+, \d{4}|"
                                                                r"\d+(?:st|nd|rd|th) of [A-Z][a-z]+ \d{4}", question))


def topic_keys(topics: list[str]) -> dict[str, str]:
    """For each topic, the part an answer must contain: its shortest run of three or more words
    (the earliest one) that no other topic contains, else the whole topic. "journal club on" is
    not a key when two journal clubs met."""
    keys = {}
    for topic in topics:
        words = topic.replace(";", " ").split()
        others = [t for t in topics if t != topic]
        keys[topic] = next((" ".join(words[start:start + size]) for size in range(min(3, len(words)), len(words) + 1)
                            for start in range(len(words) - size + 1)
                            if not any(mentions(other, " ".join(words[start:start + size])) for other in others)),
                           " ".join(words))
    return keys


def heldout_renderings(notes: list[Note]) -> list[str]:
    """Every held-out template stem and held-out date rendering of the notes' dates: none may appear
    in a training question (the data stage's output is checked against this in the tests)."""
    stems = [t.split("{d}")[0].strip() for ts in HELDOUT_TEMPLATES.values() for t in ts] + \
        [t.split("{who}")[0].strip() for t in HELDOUT_REVERSE] + \
        [t.split("{task}")[0].strip() for t in HELDOUT_ACTION + HELDOUT_DEADLINE] + \
        [t.split("{d}")[0].strip() for t in HELDOUT_DECISION] + \
        [t.split("{subject}")[0].strip() for t in HELDOUT_DECISION_ABOUT] + \
        [t.split("{who}")[0].strip() for t in HELDOUT_ATTENDANCE]
    dates = {n.date for n in notes}
    return [s for s in stems if s] + [form(d) for d in dates for form in HELDOUT_DATE_FORMS.values()]


def fact_counts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """How many training examples carry each fact (meeting date x field), for the data report."""
    counts: dict[tuple[str, str], dict[str, Any]] = {}
    for fact in (f for record in records for f in record.get("facts") or [record.get("fact")]):
        if not fact or fact.get("kind") not in ("recall", "missing", "absent"):
            continue
        key = (fact["date"], fact["field"])
        entry = counts.setdefault(key, {"date": fact["date"], "field": fact["field"], "value": fact["value"],
                                        "kind": fact["kind"], "examples": 0})
        entry["examples"] += 1
    return [counts[k] for k in sorted(counts)]
