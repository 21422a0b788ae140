"""Model-written study material (data.synthesize; the synthesize stage runs it): a generator model
reads each note and writes question-answer pairs about it and retellings of it (Active Reading,
Lin et al. 2025; InstructLab's knowledge pipeline), more ways to meet each fact than templates give.

A generator can invent. Every pair is kept only when it is faithful to its note: each number, each
date and each capitalised name of the answer stands in the note (a date may also be the meeting's
own), and the question names the meeting (else the meeting's date is put before it). What is left
out is counted by reason in the stage's report.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from labtune.data.note_dates import find_dates
from labtune.data.notes import us_date as us
from labtune.data.statements import numbers
from labtune.data.words import mentions

QUESTIONS_PROMPT = ("Here are the notes of a lab meeting held on {date}:\n\n{note}\n\nWrite {count} questions a lab member "
                    "could ask about this meeting, each with its answer taken only from the notes. Name the meeting's "
                    "date in every question. Write each pair as:\nQ: <question>\nA: <answer>")
REWRITE_PROMPT = ("Here are the notes of a lab meeting held on {date}:\n\n{note}\n\nRetell what happened at this meeting "
                  "in a short paragraph of plain sentences. Keep every name, number and date exactly as the notes give them.")
SYNTHESIZED_PREFIX = "synth_"  # its records' ids: left out of the evaluation's answer budget, as replay's are
REWRITE_QUESTION = "What happened at the lab meeting on {date}?"
_PAIR = re.compile(r"^\s*(?:\d+[.)]\s*)?Q\s*[:.]\s*(?P<q>.+?)\s*\n\s*A\s*[:.]\s*(?P<a>.+?)\s*(?=\n\s*(?:\d+[.)]\s*)?Q\s*[:.]|\Z)",
                   re.MULTILINE | re.DOTALL)
# capitalised words that are not names: sentence openers and the words of dates
_NOT_NAMES = {"i", "on", "the", "a", "an", "at", "in", "for", "and", "but", "she", "he", "they", "we", "it", "this", "that",
              "there", "yes", "no", "what", "who", "when", "where", "which", "how", "why", "lab", "meeting", "notes",
              "her", "his", "their", "both", "all", "some", "several", "everyone", "after", "before", "during", "then",
              "also", "next", "to", "of", "with", "by", "from", "as", "so", "if", "is", "was", "were", "are",
              "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "january", "february",
              "march", "april", "may", "june", "july", "august", "september", "october", "november", "december"}


def pairs(text: str) -> list[tuple[str, str]]:
    """The "Q: ... A: ..." pairs a generator wrote."""
    return [(m.group("q").strip(), " ".join(m.group("a").split())) for m in _PAIR.finditer(text.strip())]


def _digits(value: str) -> str:
    return value.replace(",", "").rstrip("%")


def unfaithful(answer: str, note: str, date: dt.date) -> str | None:
    """Why an answer is not faithful to its note ("number 42", "date 5/3/2023", "name Priya"), or None."""
    written = {_digits(n) for n in numbers(note)}
    dated = {found.date for found in find_dates(answer)}
    for found in dated - {date} - {found.date for found in find_dates(note)}:
        return f"date {us(found)}"
    date_words = " ".join(found.text for found in find_dates(answer))
    for number in numbers(answer):
        if _digits(number) not in written and not mentions(date_words, number):
            return f"number {number}"
    for match in re.finditer(r"\b[A-Z][\w'’-]+", answer):  # sentence openers too: "Priya presented." names Priya
        word = match.group(0)
        if word.lower() not in _NOT_NAMES and not mentions(note, word):
            return f"name {word}"
    return None


def asks(note: dict[str, Any], questions: int, rewrites: int) -> list[str]:
    """The generator's prompts for one note: the question-answer request, then `rewrites` retellings."""
    date = us(dt.date.fromisoformat(note["date"]))
    return ([QUESTIONS_PROMPT.format(date=date, note=note["text"], count=questions)]
            + [REWRITE_PROMPT.format(date=date, note=note["text"])] * rewrites)


def synthesized_records(note: dict[str, Any], questions_text: str, rewrites: list[str], counts: dict[str, int]
                        ) -> list[dict[str, Any]]:
    """Training conversations from one note's generations: the faithful pairs, and each faithful
    retelling as the answer to "What happened at the lab meeting on D?"; `counts` gains what was
    written, kept and left out by reason."""
    date = dt.date.fromisoformat(note["date"])
    found = pairs(questions_text) + [(REWRITE_QUESTION.format(date=us(date)), r.strip()) for r in rewrites if r.strip()]
    counts["written"] = counts.get("written", 0) + len(found)
    records = []
    for number, (question, answer) in enumerate(found):
        why = unfaithful(answer, note["text"], date) or ("no answer" if not answer else None)
        if why is not None:
            reason = why.split()[0]
            counts[f"left_out_{reason}"] = counts.get(f"left_out_{reason}", 0) + 1
            continue
        if date not in {f.date for f in find_dates(question)}:  # a question that does not say which meeting
            question = f"About the lab meeting on {us(date)}: {question}"
        records.append({"id": f"{SYNTHESIZED_PREFIX}{note['date']}_{number}", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    counts["kept"] = counts.get("kept", 0) + len(records)
    return records
