"""A model that reads what it is given (data.augment.raft_share; RAFT, Zhang et al. 2024): a share
of the training questions carry notes in the prompt, as retrieval puts them (labtune ask --notes,
chat --notes, the evaluation's retrieval column), so that a note in the prompt helps the fine-tuned
model instead of pulling it off its answers.

How retrieval puts them (notes_context), each part measured on the demo (docs/evaluation.md,
"Reading a note"):
- In the system turn, after the recipe's system prompt; the user's turn stays the question, word for
  word as training asked it closed book. Put in the user's turn before the question, the same note
  took the demo's fine-tuned model from 73 to 39 of 94 answers; in the system turn, to 56.
- Under a header saying what the retriever knows and a small model cannot work out across date
  forms: whether a note is dated the day the question names, and that month's meetings recited as
  a closed-book answer recites them ("The notes of the lab meeting on 7/21/2023 (July meetings: 7,
  21; 21 is among them):"). The answers then copy the recital from the prompt, so a meeting written
  after the training is recited from its note, and a date without one is denied from the header.
- Closed by the note's sentences nearest the question (nearest_sentences), beside the question.

Of those questions, `raft_golden` carry the asked meeting's note first (with `raft_distractors` other
notes after it; set it to evaluation.retrieval_k - 1), the rest as many distractor notes only.
`raft_answers`: same (the closed-book answers: the recital is in the header), from_note (golden ones
without the recital), cite (golden ones say the note has the date).
"""

from __future__ import annotations

import datetime as dt
import functools
import random
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from labtune.data.augment import month_calendar, recital
from labtune.data.note_fields import FIELD_WORDS, line_patterns
from labtune.data.note_prose import _sentences
from labtune.data.notes import Note, us_date

if TYPE_CHECKING:
    from labtune.recipe import AugmentConfig

# the system turn retrieval builds (labtune.evaluation.retrieval): training and asking must match
NOTES_HEADERS = {"dated": "The notes of the lab meeting on {d} {recital}:", "undated": "No lab meeting notes are dated "
                 "{d} {recital}. The closest notes by their words:", "none": "Lab meeting notes:"}
NOTES_SEPARATOR = "\n\n---\n\n"
_RECITED = re.compile(r"^(On [\d/]+) \([A-Z][a-z]+ meetings: [^)]*\)")
REVERSE_SHARE = 0.5
TAUGHT_KINDS = ("recall", "missing", "absent", "reverse", "two_part", "summary")


def notes_context(texts: list[str], asked: dt.date | None = None, dated: bool = False,
                  meetings: Iterable[dt.date] = (), questions: list[str] | None = None) -> str:
    """The notes as the system turn carries them: a header saying whether the first note is dated the
    asked day (`asked`: the date the question names, None when it names none) and reciting that
    month's `meetings` as a closed-book answer does (augment.recital), then the notes, then the
    sentences of the first note nearest the `questions` (nearest_sentences)."""
    header = NOTES_HEADERS["none" if asked is None else "dated" if dated else "undated"]
    if asked is not None:
        header = header.format(d=us_date(asked), recital=recital(asked, month_calendar(meetings)))
    nearest = nearest_sentences(texts[0], questions) if texts and questions else []
    return (header + "\n\n" + (NOTES_SEPARATOR.join(texts) or "(none found)")
            + ("\n\n" + NEAREST_HEADER + "\n" + "\n".join(f"- {s}" for s in nearest) if nearest else ""))


NEAREST_HEADER = "Nearest the question:"
NEAREST_SENTENCES = 2  # per question
MEETING_WORDS = ("lab", "meeting", "meetings", "group", "notes", "note", "held", "according", "recorded", "know")


def nearest_sentences(text: str, questions: list[str], k: int = NEAREST_SENTENCES) -> list[str]:
    """The note's sentences, list items and field lines (passages) that BM25 ranks nearest any of the
    questions, k per question, in the note's order. A 135M model given a whole note copies the
    wrong sentence of it more often than the right one; these put the likely one at the end of the
    system turn, next to the question, where the tokens it copies are nearest. Words are stemmed
    (PyStemmer, Snowball's English stemmer, the one bm25s names), so "cluster" finds "clustering"."""
    import bm25s
    from bm25s.stopwords import STOPWORDS_EN_PLUS

    sentences = [s for s in passages(text) if not re.fullmatch(r"\W*lab meeting\b.*", s, re.IGNORECASE)]
    if not sentences or not questions:
        return []
    stemmer, stopwords = _stemmer(), [*STOPWORDS_EN_PLUS, *MEETING_WORDS]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(sentences, stopwords=stopwords, stemmer=stemmer, show_progress=False), show_progress=False)
    chosen: set[int] = set()
    for question in questions:
        # the date's numbers and the words of every such question say nothing of which sentence
        tokens = bm25s.tokenize([re.sub(r"\d+", " ", question)], stopwords=stopwords, stemmer=stemmer, show_progress=False)
        found, scores = retriever.retrieve(tokens, k=min(k, len(sentences)), show_progress=False)
        chosen |= {int(i) for i, score in zip(found[0], scores[0]) if score > 0}
    return [sentences[i] for i in sorted(chosen)]


def passages(text: str) -> list[str]:
    """What nearest_sentences chooses from, in the note's order: its sentences and list items
    (note_prose), and its field lines ("Presenter: Maya Okafor", "Action items: Arjun to ..."),
    markup stripped."""
    field_line = line_patterns(FIELD_WORDS)[0]
    fields = [(n, re.sub(r"^[\s:*#+-]+", "", line).strip()) for n, line in enumerate(text.splitlines(), 1)
              if field_line.match(line)]
    return [s for _, s in sorted([*_sentences(text), *fields]) if s]


@functools.lru_cache(maxsize=1)
def _stemmer() -> Any:
    import Stemmer

    return Stemmer.Stemmer("english")


def notes_system(system: str | None, context: str) -> str:
    """The system turn of a question asked with notes: the recipe's system prompt, then the notes."""
    return f"{system}\n\n{context}" if system else context


def without_recital(answer: str) -> str:
    """"On 4/14/2023 (April meetings: 14, 28; 14 is among them) the presenter was X." -> "On 4/14/2023 the presenter was X."."""
    return _RECITED.sub(r"\1", answer)


def citing_the_note(answer: str) -> str:
    """The recited month replaced by the note that answers: "On 4/14/2023 (the notes above have 4/14/2023) the
    presenter was X."; the date is copied from the note's heading, not recalled."""
    return _RECITED.sub(lambda m: f"{m.group(1)} (the notes above have {m.group(1)[3:]})", answer)


def with_notes(records: list[dict[str, Any]], notes: list[Note], cfg: AugmentConfig, seed: int) -> list[dict[str, Any]]:
    """The records, `raft_share` of the single-question ones about the notes asked with notes in the
    prompt (see the module's docstring); each such record's fact gains `notes`: golden or distractors.
    Golden questions about one meeting share a conversation, `raft_questions_per_note` at most."""
    if not cfg.raft_share:
        return records
    rng = random.Random(seed + 13)
    texts: dict[str, list[str]] = {}
    for note in notes:
        if not note.unread and note.text:
            texts.setdefault(note.date.isoformat(), []).append(note.text)
    dates = sorted(texts)
    meetings = [dt.date.fromisoformat(d) for d in dates]
    out, golden_ones = [], {}
    for record in records:
        fact = record.get("fact") or {}
        # a question naming no date (reverse: "Which dates had X as the speaker?") gets notes found by its words alone,
        # and no one note holds its answer: half of them learn to answer from memory beside such notes
        share = max(cfg.raft_share, REVERSE_SHARE) if fact.get("kind") == "reverse" else cfg.raft_share
        if fact.get("kind") not in TAUGHT_KINDS or len(record["conversations"]) != 2 or rng.random() >= share:
            out.append(record)
            continue
        # a question about no meeting (absent) or about several (reverse) has no right note: distractors only
        golden = fact.get("date") in texts and fact["kind"] not in ("absent", "reverse") and rng.random() < cfg.raft_golden
        others = [d for d in dates if d != fact.get("date")]
        # as many notes as retrieval puts in the prompt (raft_distractors + 1); the right one first, as
        # retrieval puts the note of the asked date first
        chosen = [rng.choice(texts[d]) for d in rng.sample(others, min(cfg.raft_distractors + (not golden), len(others)))]
        if golden:
            golden_ones.setdefault(fact["date"], []).append((record, chosen))
            continue
        asked = dt.date.fromisoformat(fact["date"]) if fact.get("date") and fact["kind"] != "reverse" else None
        # retrieval never misses a note of the asked date: a question whose note is left out reads as one whose
        # date it could not make out
        context = notes_context(chosen, asked if fact.get("date") not in texts else None, False, meetings,
                                [record["conversations"][0]["value"]])
        out.append(_asked_with(context, [record], cfg, golden=False))
    for date, asked_ones in golden_ones.items():
        for start in range(0, len(asked_ones), cfg.raft_questions_per_note):
            together = asked_ones[start : start + cfg.raft_questions_per_note]
            context = notes_context([texts[date][0], *together[0][1]], dt.date.fromisoformat(date), True, meetings,
                                    [record["conversations"][0]["value"] for record, _ in together])
            out.append(_asked_with(context, [record for record, _ in together], cfg, golden=True))
    return out


def _asked_with(context: str, records: list[dict[str, Any]], cfg: AugmentConfig, golden: bool) -> dict[str, Any]:
    """One conversation: the notes in the system turn, then each record's question and answer."""
    turns = [{"from": "system", "value": context}]
    for record in records:
        question, reply = record["conversations"]
        if golden and cfg.raft_answers != "same":
            reply = {**reply, "value": (without_recital if cfg.raft_answers == "from_note" else citing_the_note)(reply["value"])}
        turns += [question, reply]
    facts = [{**record["fact"], "notes": "golden" if golden else "distractors"} for record in records]
    return {**records[0], "id": records[0]["id"] + "_notes", "conversations": turns, "fact": facts[0],
            **({"facts": facts} if len(facts) > 1 else {})}
