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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from labtune.data.note_fields import SHORT_FIELDS
from labtune.data.notes import Note, qa_conversation, us_date
from labtune.data.two_part import two_part_records
from labtune.data.wordings import (
    TRAIN_ACTION,
    TRAIN_ATTENDANCE,
    TRAIN_DATE_FORMS,
    TRAIN_DEADLINE,
    TRAIN_DECISION,
    TRAIN_DECISION_ABOUT,
    TRAIN_REVERSE,
    TRAIN_SUMMARY,
    TRAIN_TEMPLATES,
    YEARLESS_FORM,
    _month,
    asked_wordings,
)
from labtune.data.words import mentions

if TYPE_CHECKING:
    from labtune.recipe import AugmentConfig



Calendar = dict[tuple[int, int], list[dt.date]]


def month_calendar(notes: Iterable[Note | dt.date]) -> Calendar:
    """(year, month) -> that month's meeting dates, from the notes or from their dates."""
    calendar: Calendar = defaultdict(list)
    for date in sorted({n if isinstance(n, dt.date) else n.date for n in notes}):
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
        return f"On {us_date(date)}"
    return f"On {us_date(date)} {recital(date, calendar, check)}"


def recital(date: dt.date, calendar: Calendar, check: bool = True) -> str:
    """"(April meetings: 14, 28; 21 is not among them)": what `opening` recites after the date."""
    days = recited_days(date, calendar)
    verdict = (f"; {date.day} is among them" if date in days else f"; {date.day} is not among them") if check else ""
    return f"({_month(date)} meetings: {', '.join(str(d.day) for d in days) or 'none'}{verdict})"


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
        return f"{opening(date, calendar, check)} {owner} is to {task}, due {us_date(due)}."
    if owner:
        return f"{opening(date, calendar, check)} {owner} is to {task}."
    return f"{opening(date, calendar, check)} the task to {task} is due {us_date(due)}."


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


def meeting_decisions(notes: list[Note]) -> dict[dt.date, list[str]]:
    """Meeting date -> the decisions its notes record."""
    found: dict[dt.date, list[str]] = defaultdict(list)
    for note in sorted(notes, key=lambda n: n.date):
        found[note.date] += [v for v in note.values("decisions") if v not in found[note.date]]
    return {d: v for d, v in found.items() if v}


def decision_keys(notes: list[Note]) -> dict[str, str]:
    """Each decision's key (topic_keys of its outcome, the subject left out)."""
    outcomes = {d: decision_subject(d)[1] for ds in meeting_decisions(notes).values() for d in ds}
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


def meeting_actions(notes: list[Note]):
    """(date, action fact) of every action item with an owner or a due date."""
    for note in sorted(notes, key=lambda n: n.date):
        for action in note.actions:
            if action.owner or action.due:
                yield note.date, action


def _by_date(notes: list[Note]) -> dict[dt.date, list[Note]]:
    grouped: dict[dt.date, list[Note]] = defaultdict(list)
    for note in notes:
        if not note.unread:  # a meeting known only from a file name: nothing to teach of it
            grouped[note.date].append(note)
    return dict(sorted(grouped.items()))


def facts_of(notes: list[Note], fields: tuple[str, ...] = SHORT_FIELDS):
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


# data.augment off: training_conversations(plain=True) with these settings writes FastChat's plain set: each
# field in its first two training wordings, the date as 4/14/2023 (the seed's "Who is the presenter on
# 4/14/2023 lab meeting?" among them), action items, decisions and attendance as data.qa_fields asks
PLAIN_FACTS = {"questions_per_fact": 2, "reverse": False, "summaries": False, "absent_ratio": 0.0,
               "two_part_questions": 0, "recite_month": False, "attendance_questions": 1}


def facts_asked(qa_fields: tuple[str, ...]) -> dict[str, Any]:
    """training_conversations' kinds of question, from data.qa_fields."""
    return {"actions": "action_items" in qa_fields, "decisions": "decisions" in qa_fields,
            "attendance_questions": "attendees" in qa_fields, "fields": tuple(f for f in SHORT_FIELDS if f in qa_fields)}


@dataclass
class Teaching:
    """What every kind of training question draws on: one random stream (the kinds are made in a
    fixed order, so a seed gives the same data), the notes, the date forms training uses, and the
    answer's opening (the month recited when the recipe asks, checked against the calendar)."""

    rng: random.Random
    notes: list[Note]
    cfg: AugmentConfig
    forms: list[Any]
    calendar: Calendar | None
    check: bool


def training_conversations(notes: list[Note], cfg: AugmentConfig, seed: int, actions: bool = False, *, decisions: bool = False,
                           attendance_questions: bool = False, fields: tuple[str, ...] = SHORT_FIELDS,
                           plain: bool = False) -> list[dict[str, Any]]:
    """The one generator of training questions about the notes (`plain`, with data.augment off: the
    fixed set of labtune.data.conversations.PLAIN_FACTS). Every fact in TRAIN templates and date forms only, action items
    (owner and due date) among them with `actions`, each meeting's decisions with `decisions`, and
    every lab member's presence at every meeting that lists attendees with `attendance_questions`.
    `fields` are the ones of presenter, recorder and topic the recipe asks about (data.qa_fields).
    Each record carries `fact` ({kind, field, date, value}) for the data report's per-fact counts."""
    rng = random.Random(seed)
    t = Teaching(rng, notes, cfg, train_date_forms(notes), month_calendar(notes) if cfg.recite_month else None,
                 cfg.recite_check)
    dates = sorted({n.date for n in notes})
    if plain:  # each field's first wordings, the date as 4/14/2023 (the seed's question among them)
        wordings = {d: [(i, TRAIN_DATE_FORMS["us"]) for i in range(cfg.questions_per_fact)] for d in dates}
    else:
        wordings = asked_wordings(dates, t.forms, cfg.questions_per_fact, rng)
    records = recall_records(t, wordings, fields)
    if cfg.summaries and fields:
        records += summary_records(t, fields, decisions)
    if actions:
        records += action_records(t)
    if decisions:
        records += decision_records(t)
    if attendance_questions:
        records += attendance_records(t)
    if cfg.reverse:
        records += reverse_records(t)
    if cfg.two_part_questions and {"presenter", "topic"} <= set(fields):
        records += two_part_records(facts_of(notes, ("presenter", "topic")), lambda d: opening(d, t.calendar, t.check),
                                    t.forms, rng, cfg.two_part_questions, qa_conversation)
    return records + absent_records(t, seed, fields)


def recall_records(t: Teaching, wordings: dict[dt.date, list[tuple[int, Any]]], fields: tuple[str, ...]
                   ) -> list[dict[str, Any]]:
    """Every fact in the meeting's trained wordings (recall; a field the notes leave empty: missing)."""
    notes, calendar, check = t.notes, t.calendar, t.check
    records: list[dict[str, Any]] = []
    for date, field, values in facts_of(notes, fields):
        iso = date.isoformat()
        reply = answer(date, field, values, calendar, check)
        templates = TRAIN_TEMPLATES[field]
        for i, (shape, form) in enumerate(wordings[date]):
            records.append(qa_conversation(f"labnote_{iso}_{field}_{i}", templates[shape % len(templates)].format(d=form(date)),
                                 reply, {"kind": "recall" if values else "missing", "field": field, "date": iso,
                                         "value": " | ".join(values)}))
    return records


def summary_records(t: Teaching, fields: tuple[str, ...], decisions: bool) -> list[dict[str, Any]]:
    """A meeting's fields (and decisions) in one answer."""
    notes = t.notes
    rng, forms, calendar, check = t.rng, t.forms, t.calendar, t.check
    records: list[dict[str, Any]] = []
    for date, meetings in _by_date(notes).items():
        parts = [f"the {f} was {' and '.join(v for m in meetings for v in m.values(f))}"
                 for f in fields if any(m.values(f) for m in meetings)]
        decided = meeting_decisions(meetings).get(date, []) if decisions else []
        reply = (f"{opening(date, calendar, check)} " + ", ".join(parts)
                 + (f"; the lab decided: {'; '.join(decided)}" if decided else "") + ".")
        for i, template in enumerate(TRAIN_SUMMARY):
            records.append(qa_conversation(f"labnote_{date.isoformat()}_summary_{i}", template.format(d=rng.choice(forms)(date)),
                                 reply, {"kind": "summary", "field": "summary", "date": date.isoformat(),
                                                   "value": ""}))
    return records


def action_records(t: Teaching) -> list[dict[str, Any]]:
    """Who took on each action item and when it is due."""
    notes, cfg = t.notes, t.cfg
    rng, forms, calendar, check = t.rng, t.forms, t.calendar, t.check
    records: list[dict[str, Any]] = []
    for date, action in meeting_actions(notes):
        iso, slug = date.isoformat(), slugged(action.value)[:40]
        both = task_answer(date, action.value, action.owner, action.due and dt.date.fromisoformat(action.due),
                           calendar, check)
        asked = [("action", TRAIN_ACTION, action.owner and both, action.owner),
                 ("deadline", TRAIN_DEADLINE, action.due and both, action.due)]
        for field, templates, reply, value in asked:
            if not reply:
                continue
            pairs = [(t, f) for t in templates for f in forms]
            for i, (template, form) in enumerate(rng.sample(pairs, min(cfg.questions_per_fact, len(pairs)))):
                records.append(qa_conversation(f"labnote_{iso}_{field}_{slug}_{i}", template.format(task=action.value, d=form(date)),
                                     reply, {"kind": "recall", "field": field, "date": iso, "value": value}))
    return records


def decision_records(t: Teaching) -> list[dict[str, Any]]:
    """What each meeting decided, and what it decided about each decision's subject."""
    notes, cfg = t.notes, t.cfg
    rng, forms, calendar, check = t.rng, t.forms, t.calendar, t.check
    records: list[dict[str, Any]] = []
    for date, made in meeting_decisions(notes).items():
        iso, reply = date.isoformat(), decision_answer(date, made, calendar, check)
        pairs = [(t, f) for t in TRAIN_DECISION for f in forms]
        for i, (template, form) in enumerate(rng.sample(pairs, min(cfg.questions_per_fact, len(pairs)))):
            records.append(qa_conversation(f"labnote_{iso}_decision_{i}", template.format(d=form(date)), reply,
                                 {"kind": "recall", "field": "decision", "date": iso, "value": " | ".join(made)}))
        for decision in made:
            subject, _ = decision_subject(decision)
            if subject is None:
                continue
            pairs = [(t, f) for t in TRAIN_DECISION_ABOUT for f in forms]
            for i, (template, form) in enumerate(rng.sample(pairs, min(2, len(pairs)))):
                records.append(qa_conversation(f"labnote_{iso}_decision_{slugged(subject)}_{i}",
                                     template.format(subject=subject, d=form(date)),
                                     decision_answer(date, [decision], calendar, check),
                                     {"kind": "recall", "field": "decision", "date": iso, "value": decision}))
    return records


def attendance_records(t: Teaching) -> list[dict[str, Any]]:
    """Every lab member's presence at every meeting that lists attendees."""
    notes, cfg = t.notes, t.cfg
    rng, forms, calendar, check = t.rng, t.forms, t.calendar, t.check
    records: list[dict[str, Any]] = []
    for date, present in attendance(notes).items():
        iso = date.isoformat()
        attendees = [w for w, p in present.items() if p]
        for who, there in present.items():
            pairs = [(t, f) for t in TRAIN_ATTENDANCE for f in forms]
            for i, (template, form) in enumerate(rng.sample(pairs, min(cfg.attendance_questions, len(pairs)))):
                records.append(qa_conversation(f"labnote_{iso}_attendance_{slugged(who)}_{i}",
                                     template.format(who=who, d=form(date)),
                                     attendance_answer(date, who, there, calendar, check, attendees),
                                     {"kind": "recall", "field": "attendance", "date": iso,
                                      "value": f"{who}: {'yes' if there else 'no'}"}))
    return records


def reverse_records(t: Teaching) -> list[dict[str, Any]]:
    """Who -> when: every date each person presented."""
    notes = t.notes
    records: list[dict[str, Any]] = []
    for who, dates in presented_dates(notes).items():
        reply = f"{who} presented on {', '.join(us_date(d) for d in dates)}."
        for i, template in enumerate(TRAIN_REVERSE):
            records.append(qa_conversation(f"labnote_reverse_{slugged(who)}_{i}", template.format(who=who), reply,
                                 {"kind": "reverse", "field": "presenter", "date": "", "value": who}))
    return records


def absent_records(t: Teaching, seed: int, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """No-meeting dates asked in every training template of every field."""
    notes, cfg, rng, calendar, check = t.notes, t.cfg, t.rng, t.calendar, t.check
    records: list[dict[str, Any]] = []
    # No-meeting questions in every training template of every field, as the real ones are: the
    # fields take turns on each date, and each field's templates take turns across dates, so that
    # abstention is a property of the date, not of the wordings it happened to be trained in.
    absent_fields = fields or SHORT_FIELDS
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
            records.append(qa_conversation(f"absent_{date.isoformat()}_{field}_{i}", template.format(d=form(date)),
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


def presented_dates(notes: list[Note]) -> dict[str, list[dt.date]]:
    found: dict[str, list[dt.date]] = defaultdict(list)
    for note in sorted(notes, key=lambda n: n.date):
        for who in note.values("presenter"):
            if note.date not in found[who]:
                found[who].append(note.date)
    return dict(sorted(found.items()))


def slugged(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower())


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
