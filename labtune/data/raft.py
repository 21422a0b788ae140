"""A model that reads what it is given (data.augment.raft_share; RAFT, Zhang et al. 2024): a share
of the training questions carry notes in the prompt, as retrieval puts them (labtune ask --notes,
the evaluation's retrieval column), so that a note in the prompt helps the fine-tuned model instead
of pulling it off its answers.

Of those questions, `raft_golden` carry the asked meeting's note (with `raft_distractors` other
notes around it, in a random place; set it to evaluation.retrieval_k - 1) and are answered without reciting the month's meetings: the
note, not memory, says the meeting took place, so a meeting written after the training is read
from its note. The rest carry as many distractor notes only and keep the closed-book answer: the model
learns to answer from memory when the notes in the prompt do not hold the answer.
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING, Any

from labtune.data.notes import Note

if TYPE_CHECKING:
    from labtune.recipe import AugmentConfig

# the prompt retrieval builds (labtune.evaluation.retrieval): training and asking must match
NOTES_PROMPT = "Lab meeting notes:\n\n{notes}\n\nAnswer from the notes above. {question}"
NOTES_SEPARATOR = "\n\n---\n\n"
_RECITED = re.compile(r"^(On [\d/]+) \([A-Z][a-z]+ meetings: [^)]*\)")
TAUGHT_KINDS = ("recall", "missing", "absent", "reverse", "two_part", "summary")


def without_recital(answer: str) -> str:
    """"On 4/14/2023 (April meetings: 14, 28; 14 is among them) the presenter was X." -> "On 4/14/2023 the presenter was X."."""
    return _RECITED.sub(r"\1", answer)


def citing_the_note(answer: str) -> str:
    """The recited month replaced by the note that answers: "On 4/14/2023 (the notes above have 4/14/2023) the
    presenter was X."; the date is copied from the note's heading, not recalled."""
    return _RECITED.sub(lambda m: f"{m.group(1)} (the notes above have {m.group(1)[3:]})", answer)


def with_notes(records: list[dict[str, Any]], notes: list[Note], cfg: AugmentConfig, seed: int) -> list[dict[str, Any]]:
    """The records, `raft_share` of the single-question ones about the notes asked with notes in the
    prompt (see the module's docstring); each such record's fact gains `notes`: golden or distractors."""
    if not cfg.raft_share:
        return records
    rng = random.Random(seed + 13)
    texts: dict[str, list[str]] = {}
    for note in notes:
        if not note.unread and note.text:
            texts.setdefault(note.date.isoformat(), []).append(note.text)
    dates = sorted(texts)
    out = []
    for record in records:
        fact = record.get("fact") or {}
        turns = record["conversations"]
        if fact.get("kind") not in TAUGHT_KINDS or len(turns) != 2 or rng.random() >= cfg.raft_share:
            out.append(record)
            continue
        # a question about no meeting (absent) or about several (reverse) has no right note: distractors only
        golden = fact.get("date") in texts and fact["kind"] not in ("absent", "reverse") and rng.random() < cfg.raft_golden
        others = [d for d in dates if d != fact.get("date")]
        # as many notes as retrieval puts in the prompt (raft_distractors + 1), the right one among them or not
        chosen = [rng.choice(texts[d]) for d in rng.sample(others, min(cfg.raft_distractors + (not golden), len(others)))]
        if golden:
            chosen.insert(rng.randint(0, len(chosen)), texts[fact["date"]][0])
        question = NOTES_PROMPT.format(notes=NOTES_SEPARATOR.join(chosen), question=turns[0]["value"])
        reply = turns[1]["value"]
        if golden and cfg.raft_answers != "same":
            reply = (without_recital if cfg.raft_answers == "from_note" else citing_the_note)(reply)
        out.append({**record, "id": record["id"] + "_notes",
                    "conversations": [{**turns[0], "value": question}, {**turns[1], "value": reply}],
                    "fact": {**fact, "notes": "golden" if golden else "distractors"}})
    return out
