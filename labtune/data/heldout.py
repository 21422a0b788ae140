"""What training never sees: the evaluation prompts on their axes (recall, paraphrase, reverse,
absent, action, deadline, decision, attendance), each in held-out wordings and date forms, and
the dev questions early stopping asks."""

from __future__ import annotations

import datetime as dt
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from labtune.data.augment import (
    NOT_PRESENT,
    PRESENT,
    absent_answer,
    absent_dates,
    answer,
    attendance,
    decision_keys,
    decision_subject,
    eval_absent_dates,
    facts_of,
    meeting_actions,
    meeting_decisions,
    month_calendar,
    presented_dates,
    slugged,
    task_answer,
    topic_keys,
    training_absent_dates,
    training_conversations,
)
from labtune.data.note_fields import PERSON_FIELDS, SHORT_FIELDS, people
from labtune.data.notes import Note, us_date
from labtune.data.two_part import two_part_prompts
from labtune.data.wordings import (
    HELDOUT_ACTION,
    HELDOUT_ATTENDANCE,
    HELDOUT_DATE_FORMS,
    HELDOUT_DEADLINE,
    HELDOUT_DECISION,
    HELDOUT_DECISION_ABOUT,
    HELDOUT_REVERSE,
    HELDOUT_TEMPLATES,
    TRAIN_DATE_FORMS,
    TRAIN_TEMPLATES,
)
from labtune.data.words import mentions

if TYPE_CHECKING:
    from labtune.recipe import AugmentConfig


CLAIMS_NONE = "no lab meeting"


@dataclass
class Asking:
    """What every axis's prompts draw on: one random stream (the axes are asked in a fixed order,
    so a seed gives the same prompts), the people, meetings and topic keys, the held-out date
    forms, and the whole-note training text whose renderings are not asked."""

    rng: random.Random
    notes: list[Note]
    seen: str
    everyone: list[str]
    meetings: list[dt.date]
    keys: dict[str, str]
    held_forms: list[Any]


def eval_prompts(notes: list[Note], cfg: AugmentConfig, seed: int, training: list[dict[str, Any]] | None = None,
                 actions: bool = False, seen: str = "", *, decisions: bool = False,
                 attendance_questions: bool = False, fields: tuple[str, ...] = SHORT_FIELDS) -> list[dict[str, Any]]:
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
    ask = Asking(random.Random(seed + 1), notes, seen, people(notes), sorted({n.date for n in notes}),
                 topic_keys([v for _, f, vs in facts_of(notes) if f == "topic" for v in vs]), list(HELDOUT_DATE_FORMS.values()))
    trained: dict[tuple[str, str], list[str]] = defaultdict(list)
    for record in training if training is not None else training_conversations(notes, cfg, seed, actions, fields=fields):
        if record["fact"]["kind"] == "recall":
            trained[(record["fact"]["date"], record["fact"]["field"])].append(record["conversations"][0]["value"])
    prompts = fact_prompts(ask, trained, fields, cfg.recall_questions)
    if actions:
        prompts += action_prompts(ask)
    dkeys = decision_keys(notes) if decisions else {}
    if decisions:
        prompts += decision_prompts(ask, dkeys)
    if attendance_questions:
        prompts += attendance_prompts(ask)
    if cfg.reverse:
        prompts += [{"id": f"reverse_{slugged(who)}", "question": ask.rng.choice(HELDOUT_REVERSE).format(who=who),
                     "expected_all": [us_date(d) for d in dates],
                     "forbidden": [us_date(d) for d in ask.meetings if d not in dates], "tags": ["reverse", "presenter"]}
                    for who, dates in presented_dates(notes).items()]
    prompts += absent_prompts(ask, cfg, seed, dkeys, fields)
    if cfg.two_part_questions and {"presenter", "topic"} <= set(fields):  # last: the other axes' draws stay as they were
        prompts += two_part_prompts(facts_of(notes, ("presenter", "topic")), ask.rng, ask.held_forms, seen, ask.keys,
                                    ask.everyone)
    return prompts


def fact_prompts(ask: Asking, trained: dict[tuple[str, str], list[str]], fields: tuple[str, ...],
                 recall: bool = True) -> list[dict[str, Any]]:
    """`recall` (a question training showed; unless `recall` is off) and `paraphrase` (a held-out
    template and date form) per fact."""
    prompts = []
    for date, field, values in facts_of(ask.notes, fields):
        if not values:
            continue
        iso = date.isoformat()
        if field in PERSON_FIELDS:
            expected, forbidden = values, [p for p in ask.everyone if p not in values]
        else:
            expected = [ask.keys[v] for v in values]
            forbidden = sorted({k for k in ask.keys.values() if not any(mentions(v, k) for v in values)})
        trained_wording = ask.rng.choice(trained[(iso, field)])  # drawn either way: the other draws stay as they were
        template, form = ask.rng.choice(HELDOUT_TEMPLATES[field]), ask.rng.choice(ask.held_forms)
        for axis, question in (("recall", trained_wording), ("paraphrase", template.format(d=form(date)))):
            if axis == "recall" and not recall or axis == "paraphrase" and form(date) in ask.seen:
                continue
            prompts.append({"id": f"{axis}_{iso}_{field}", "question": question, "expected": expected,
                            "forbidden": [*forbidden, CLAIMS_NONE], "tags": [axis, field]})
    return prompts


def action_prompts(ask: Asking) -> list[dict[str, Any]]:
    """`action` (who took on a task) and `deadline` (when it is due), in held-out wordings."""
    prompts = []
    dues = {a.due for _, a in meeting_actions(ask.notes) if a.due}
    for date, action in meeting_actions(ask.notes):
        form = ask.rng.choice(ask.held_forms)
        if form(date) in ask.seen:
            continue
        if action.owner:
            prompts.append({"id": f"action_{date.isoformat()}_{slugged(action.value)[:40]}",
                            "question": ask.rng.choice(HELDOUT_ACTION).format(task=action.value, d=form(date)),
                            "expected": [action.owner],
                            "forbidden": [*(p for p in ask.everyone if p != action.owner), CLAIMS_NONE],
                            "tags": ["action", "action_items"]})
        if action.due:
            prompts.append({"id": f"deadline_{date.isoformat()}_{slugged(action.value)[:40]}",
                            "question": ask.rng.choice(HELDOUT_DEADLINE).format(task=action.value, d=form(date)),
                            "expected": [us_date(dt.date.fromisoformat(action.due))],
                            # the meeting's own date is the question's, an answer may repeat it
                            "forbidden": [*(us_date(dt.date.fromisoformat(d))
                                            for d in sorted(dues - {action.due, date.isoformat()})), CLAIMS_NONE],
                            "tags": ["deadline", "action_items"]})
    return prompts


def decision_prompts(ask: Asking, dkeys: dict[str, str]) -> list[dict[str, Any]]:
    """`decision`: what a meeting decided, and what it decided about a decision's subject."""
    prompts = []
    for date, decided in meeting_decisions(ask.notes).items():
        form = ask.rng.choice(ask.held_forms)
        if form(date) in ask.seen:
            continue
        others = sorted({k for d, k in dkeys.items() if d not in decided and not any(mentions(v, k) for v in decided)})
        prompts.append({"id": f"decision_{date.isoformat()}",
                        "question": ask.rng.choice(HELDOUT_DECISION).format(d=form(date)),
                        "expected": [dkeys[d] for d in decided], "forbidden": [*others, CLAIMS_NONE],
                        "tags": ["decision", "decisions"]})
        for decision in decided:
            subject, _ = decision_subject(decision)
            if subject is not None:
                prompts.append({"id": f"decision_{date.isoformat()}_{slugged(subject)[:40]}",
                                "question": ask.rng.choice(HELDOUT_DECISION_ABOUT).format(subject=subject, d=form(date)),
                                "expected": [dkeys[decision]], "forbidden": [*others, CLAIMS_NONE],
                                "tags": ["decision", "decisions"]})
    return prompts


def attendance_prompts(ask: Asking) -> list[dict[str, Any]]:
    """`attendance`: one member who was there and one who was not, scored as a pair."""
    prompts = []
    for date, present in attendance(ask.notes).items():
        there = [w for w, p in present.items() if p and len(w.split()) > 1]
        away = [w for w, p in present.items() if not p]
        form = ask.rng.choice(ask.held_forms)
        if not there or not away or form(date) in ask.seen:
            continue
        pair = f"attendance_{date.isoformat()}"
        for who, yes in ((ask.rng.choice(there), True), (ask.rng.choice(away), False)):
            prompts.append({"id": f"{pair}_{slugged(who)}", "pair": pair,
                            "question": ask.rng.choice(HELDOUT_ATTENDANCE).format(who=who, d=form(date)),
                            "expected": [PRESENT if yes else NOT_PRESENT],
                            "forbidden": [NOT_PRESENT if yes else PRESENT, CLAIMS_NONE],
                            "tags": ["attendance", "attendees"]})
    return prompts


def absent_prompts(ask: Asking, cfg: AugmentConfig, seed: int, dkeys: dict[str, str],
                   fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each no-meeting date asked twice: in a held-out wording (`absent`) and in a trained one
    (`absent_trained`); the dates themselves are never in training either way."""
    prompts = []
    nothing_else = [*ask.everyone, *sorted(set(ask.keys.values()) | set(dkeys.values())),
                    *(us_date(d) for d in ask.meetings)]
    for date in eval_absent_dates(ask.notes, cfg, seed):
        mentioned = any(form(date) in ask.seen for form in [*ask.held_forms, *TRAIN_DATE_FORMS.values()])
        field = ask.rng.choice(fields or SHORT_FIELDS)
        question = ask.rng.choice(HELDOUT_TEMPLATES[field]).format(d=ask.rng.choice(ask.held_forms)(date))
        trained_field = ask.rng.choice(fields or SHORT_FIELDS)
        trained_question = ask.rng.choice(TRAIN_TEMPLATES[trained_field]).format(
            d=ask.rng.choice(list(TRAIN_DATE_FORMS.values()))(date))
        if mentioned:
            continue
        prompts.append({"id": f"absent_{date.isoformat()}", "question": question, "expected": [CLAIMS_NONE],
                        "forbidden": nothing_else, "tags": ["absent", field]})
        prompts.append({"id": f"absent_trained_{date.isoformat()}", "question": trained_question,
                        "expected": [CLAIMS_NONE], "forbidden": nothing_else, "tags": ["absent_trained", trained_field]})
    return prompts


def dev_conversations(notes: list[Note], cfg: AugmentConfig, seed: int, prompts: list[dict[str, Any]], actions: bool = False,
                      seen: str = "", *, fields: tuple[str, ...] = SHORT_FIELDS) -> list[dict[str, Any]]:
    """`cfg.dev_questions` conversations for early stopping (train.eval_strategy): trained facts
    asked in HELD-OUT templates and date forms, never in the words of an evaluation prompt, and
    no-meeting dates that neither training nor the evaluation asks, each with the answer training
    teaches. A model that answers these word for word has learned the facts, not the wordings."""
    rng = random.Random(seed + 5)
    calendar = month_calendar(notes) if cfg.recite_month else None
    check, held_forms = cfg.recite_check, list(HELDOUT_DATE_FORMS.values())
    asked = {p["question"] for p in prompts}
    facts: list[tuple[str, list[str], str]] = []  # (id, questions to choose from, answer)
    for date, field, values in facts_of(notes, fields):
        if values:
            questions = [t.format(d=f(date)) for t in HELDOUT_TEMPLATES[field] for f in held_forms]
            facts.append((f"dev_{date.isoformat()}_{field}", questions, answer(date, field, values, calendar, check)))
    if actions:
        for date, action in meeting_actions(notes):
            reply = task_answer(date, action.value, action.owner, action.due and dt.date.fromisoformat(action.due),
                                calendar, check)
            for field, templates in (("action", HELDOUT_ACTION), ("deadline", HELDOUT_DEADLINE)):
                if (action.owner if field == "action" else action.due):
                    questions = [t.format(task=action.value, d=f(date)) for t in templates for f in held_forms]
                    facts.append((f"dev_{date.isoformat()}_{field}_{slugged(action.value)[:40]}", questions, reply))
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
