"""Two things about one meeting in one question ("Who presented at the 4/14/2023 lab meeting and
what was the talk about?"): training questions in TRAIN wordings whose answer gives both, and one
held-out question per meeting (tag `two_part`), right only when the answer names the presenter and
the topic. A model trained on one field per question answers only the first thing asked.

Given the meetings' facts (augment.facts_of) and the answer's opening by the caller, so that this
module imports only the wordings."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

from labtune.data.wordings import HELDOUT_TWO_PART, TRAIN_TWO_PART

Facts = Iterable[tuple[Any, str, list[str]]]  # (date, field, values), as augment.facts_of gives them


def meetings_with_both(facts: Facts) -> list[tuple[Any, list[str], list[str]]]:
    """(date, presenters, topics) of each meeting date whose notes name a presenter and a topic."""
    found: dict[Any, dict[str, list[str]]] = {}
    for date, field, values in facts:
        found.setdefault(date, {})[field] = values
    return [(date, f["presenter"], f["topic"]) for date, f in found.items() if f.get("presenter") and f.get("topic")]


def two_part_records(facts: Facts, opening: Callable[[Any], str], forms: list[Any], rng: random.Random, count: int,
                     conversation: Callable[..., dict[str, Any]]) -> list[dict[str, Any]]:
    """`count` training questions per meeting, in TRAIN wordings and date forms, each answered with
    the presenter and the topic after the meeting's opening."""
    records = []
    for date, presenters, topics in meetings_with_both(facts):
        reply = f"{opening(date)} the presenter was {' and '.join(presenters)} and the topic was {' and '.join(topics)}."
        for i in range(count):
            question = TRAIN_TWO_PART[i % len(TRAIN_TWO_PART)].format(d=rng.choice(forms)(date))
            records.append(conversation(f"labnote_{date.isoformat()}_two_part_{i}", question, reply,
                                        {"kind": "two_part", "field": "two_part", "date": date.isoformat(), "value": ""}))
    return records


def two_part_prompts(facts: Facts, rng: random.Random, forms: list[Any], seen: str, keys: dict[str, str],
                     everyone: list[str]) -> list[dict[str, Any]]:
    """One held-out two-part question per meeting: the presenter(s) and the topic's key expected,
    every other person forbidden. A date rendering the training text holds is not asked."""
    prompts = []
    for date, presenters, topics in meetings_with_both(facts):
        form = rng.choice(forms)
        if form(date) in seen:
            continue
        prompts.append({"id": f"two_part_{date.isoformat()}", "question": rng.choice(HELDOUT_TWO_PART).format(d=form(date)),
                        "expected_all": [*presenters, *(keys[t] for t in topics)],
                        "forbidden": [p for p in everyone if p not in presenters], "tags": ["two_part"]})
    return prompts
