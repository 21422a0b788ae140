"""Statements taught and asked (data.augment.statement_questions): each statement of a note
(labtune.data.statements) asked about its subjects in TRAIN wordings and date forms, answered with
its own words after the meeting's date; one question per statement in a HELD-OUT wording and date
form for the evaluation (tags `statement`, and `result` or `plan` where it is one).

Action items and decisions are statements too where the recipe does not teach them as fields
(data.qa_fields without action_items or decisions): "What did Daniel have to order?" is then
answered from the action item's line.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from labtune.data.augment import _by_date, month_calendar, opening, train_date_forms
from labtune.data.heldout import CLAIMS_NONE
from labtune.data.note_fields import people
from labtune.data.notes import Note, qa_conversation, us_date
from labtune.data.statements import PLAN, RESULT, SAID, named, numbers, subjects
from labtune.data.wordings import (
    HELDOUT_DATE_FORMS,
    HELDOUT_STATEMENT,
    HELDOUT_STATEMENT_KIND,
    TRAIN_STATEMENT,
    TRAIN_STATEMENT_BY,
    TRAIN_STATEMENT_KIND,
)
from labtune.data.words import mentions

if TYPE_CHECKING:
    from labtune.recipe import AugmentConfig

@dataclass
class Statement:
    date: dt.date
    text: str  # as the answer gives it, after the date
    kind: str
    subjects: list[str]
    people: list[str]


def _as_continued(text: str, names: list[str]) -> str:
    """The sentence as it reads after "On 1/13/2023": its first letter small unless it opens a
    name or an acronym ("Raw stacks ..." -> "raw stacks ...", "F0 fish ..." stays)."""
    first = text.split()[0]
    if any(name.split()[0] == first.strip(",;:") for name in names) or (len(first) > 1 and not first[1:].islower()):
        return text
    return text[0].lower() + text[1:]


def meeting_statements(notes: list[Note], fields: tuple[str, ...]) -> list[Statement]:
    """Every meeting's statements, in date order, the action items and decisions among them when
    `fields` (data.qa_fields) does not teach those."""
    everyone = people(notes)
    found: list[Statement] = []
    for date, meetings in _by_date(notes).items():
        for note in meetings:
            names = sorted(set(everyone) | {v for f in note.facts if f.field in ("presenter", "recorder", "attendees")
                                            for v in [f.value]} | {f.owner for f in note.facts if f.owner})
            for fact in note.facts:
                task = False
                if fact.field == "statement":
                    text, kind, about = _as_continued(fact.value, names), fact.kind or SAID, fact.value
                elif fact.field == "action_items" and "action_items" not in fields and fact.owner:
                    due = f", due {us_date(dt.date.fromisoformat(fact.due))}" if fact.due else ""
                    text, kind, about = f"{fact.owner} is to {fact.value}{due}.", PLAN, fact.value
                    task = True
                elif fact.field == "decisions" and "decisions" not in fields:
                    text, kind, about = f"the lab decided: {fact.value}.", SAID, fact.value
                else:
                    continue
                keys = subjects(about, names, task)
                if keys:
                    found.append(Statement(date, text, kind, keys, named(text, names)))
    return found


def _who(rng: random.Random, full: str) -> str:
    return rng.choice([full, full.split()[0]])  # people ask "what did Daniel say", as often as the full name


def statement_records(notes: list[Note], cfg: AugmentConfig, seed: int, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """`statement_questions` training questions per statement, each on one of its subjects, in a
    TRAIN wording (the kind's, or one naming a person it names) and a TRAIN date form."""
    rng = random.Random(seed + 11)
    calendar = month_calendar(notes) if cfg.recite_month else None
    forms = train_date_forms(notes)
    records: list[dict[str, Any]] = []
    for number, statement in enumerate(meeting_statements(notes, fields)):
        iso = statement.date.isoformat()
        reply = f"{opening(statement.date, calendar, cfg.recite_check)} {statement.text}"
        templates = TRAIN_STATEMENT + TRAIN_STATEMENT_KIND.get(statement.kind, [])
        if statement.people:
            templates = templates + TRAIN_STATEMENT_BY
        chosen_forms = rng.sample(forms, len(forms))
        shapes = rng.sample(templates, len(templates))
        for i in range(cfg.statement_questions):
            template, subject = shapes[i % len(shapes)], statement.subjects[i % len(statement.subjects)]
            who = _who(rng, statement.people[0]) if statement.people else ""
            question = template.format(s=subject, d=chosen_forms[i % len(chosen_forms)](statement.date), who=who)
            records.append(qa_conversation(f"labnote_{iso}_statement_{number}_{i}", question, reply,
                                 {"kind": "recall", "field": "statement", "date": iso, "value": statement.text}))
    return records


def expectation(statement: Statement, question: str, subject: str) -> dict[str, Any] | None:
    """What a right answer holds that the question does not give away: every number of the
    statement, else another of its subjects, else a person it names; None when nothing is left."""
    given = {w.lower() for w in subject.split()}
    nums = [n for n in numbers(statement.text) if not mentions(question, n)]
    if nums:
        return {"expected_all": nums}
    others = [s for s in statement.subjects if not given & {w.lower() for w in s.split()}]
    if others:
        return {"expected": others}
    # a person as the statement writes them: "Lena", where it does not give the full name
    who = [p if mentions(statement.text, p) else p.split()[0] for p in statement.people if not mentions(question, p.split()[0])]
    return {"expected": who} if who else None


def statement_prompts(notes: list[Note], cfg: AugmentConfig, seed: int, fields: tuple[str, ...], seen: str = ""
                      ) -> list[dict[str, Any]]:
    """One evaluation question per statement in a HELD-OUT wording and date form (the first
    `eval_statements` of each meeting, when set); wrong when it says there was no meeting or names
    another statement of the meeting (by its first subject)."""
    rng = random.Random(seed + 12)
    held_forms = list(HELDOUT_DATE_FORMS.values())
    statements = meeting_statements(notes, fields)
    prompts: list[dict[str, Any]] = []
    for number, statement in enumerate(statements):
        subject = rng.choice(statement.subjects)
        template = rng.choice(HELDOUT_STATEMENT + HELDOUT_STATEMENT_KIND.get(statement.kind, []))
        form = rng.choice(held_forms)
        question = template.format(s=subject, d=form(statement.date))
        expected = expectation(statement, question, subject)
        if expected is None or form(statement.date) in seen:
            continue
        neighbours = sorted({s.subjects[0] for s in statements if s.date == statement.date and s is not statement
                             and not mentions(statement.text, s.subjects[0]) and not mentions(question, s.subjects[0])})
        kind = [statement.kind] if statement.kind in (RESULT, PLAN) else []
        asked = sum(1 for p in prompts if p["id"].startswith(f"statement_{statement.date.isoformat()}_"))
        if cfg.eval_statements and asked >= cfg.eval_statements:
            continue
        prompts.append({"id": f"statement_{statement.date.isoformat()}_{number}", "question": question, **expected,
                        "forbidden": [*neighbours, CLAIMS_NONE], "tags": ["statement", *kind]})
    return prompts
