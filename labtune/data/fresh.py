"""Notes written since the last training (evaluation.fresh_meetings): the latest meetings are kept
out of training altogether, as if written after it, and asked in held-out wordings (tag `fresh`).
The model can only answer them by reading the note retrieval puts in the prompt, so the tag's
score with notes is what a lab gets for this week's minutes before the next training."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from labtune.data.augment import facts_of, topic_keys
from labtune.data.heldout import CLAIMS_NONE
from labtune.data.note_fields import PERSON_FIELDS, people
from labtune.data.notes import Note
from labtune.data.statement_questions import statement_prompts
from labtune.data.wordings import HELDOUT_DATE_FORMS, HELDOUT_TEMPLATES
from labtune.data.words import mentions

if TYPE_CHECKING:
    from labtune.recipe import AugmentConfig


def fresh_dates(notes: list[Note], count: int) -> set:
    """The `count` latest meeting dates (the notes a lab adds after a training)."""
    return set(sorted({n.date for n in notes if not n.unread})[-count:]) if count else set()


def fresh_prompts(notes: list[Note], fresh: list[Note], cfg: AugmentConfig, seed: int, fields: tuple[str, ...],
                  qa_fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each fresh meeting's presenter, recorder and topic (those of `fields`) in a held-out wording
    and date form, and its statements when data.augment.statement_questions is on; scored against
    every person and topic of all the notes, and "no lab meeting"."""
    rng = random.Random(seed + 14)
    everyone = people(notes)
    keys = topic_keys([v for _, f, vs in facts_of(notes) if f == "topic" for v in vs])
    forms = list(HELDOUT_DATE_FORMS.values())
    prompts = []
    for date, field, values in facts_of(fresh, fields):
        if not values:
            continue
        if field in PERSON_FIELDS:
            expected, forbidden = values, [p for p in everyone if p not in values]
        else:
            expected = [keys[v] for v in values]
            forbidden = sorted({k for k in keys.values() if not any(mentions(v, k) for v in values)})
        question = rng.choice(HELDOUT_TEMPLATES[field]).format(d=rng.choice(forms)(date))
        prompts.append({"id": f"fresh_{date.isoformat()}_{field}", "question": question, "expected": expected,
                        "forbidden": [*forbidden, CLAIMS_NONE], "tags": ["fresh", field]})
    if cfg.statement_questions:
        for prompt in statement_prompts(fresh, cfg, seed, qa_fields):
            prompts.append({**prompt, "id": "fresh_" + prompt["id"], "tags": ["fresh", "fresh_statement"]})
    return prompts
