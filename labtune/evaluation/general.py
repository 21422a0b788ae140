"""General ability, without torch: the general questions both models answer, the replay prompts,
reference answers for the perplexity ratio, and `hijacked`: does an answer to a general question
talk about the lab's meetings?

A fine-tune on lab notes alone learns that every question is answered with a meeting fact
("What is the capital of France?" -> "On 3/10/2023 ... the topic was fish facility water
quality."). An answer is hijacked when it names a meeting date (in any of the forms the notes and
the training answers use), a lab member, a meeting's topic, or speaks of lab meetings or the notes.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labtune.data.words import mentions
from labtune.evaluation.prompts import Prompt, PromptError, load_prompts

GENERAL_DIR = Path(__file__).resolve().parent.parent / "data" / "general"
BUILTIN_QUESTIONS = GENERAL_DIR / "vicuna_bench_questions.jsonl"  # FastChat's, Apache-2.0 (NOTICE.md)
BUILTIN_REPLAY = GENERAL_DIR / "replay_prompts.txt"  # labtune's own

# words that only an answer about the lab's meetings uses
LAB_WORDS = re.compile(r"\b(lab|group) meetings?\b|\bin the (lab )?notes\b|\bthe notes (do not|don't|say)\b"
                       r"|\b(presenter|recorder|note taker) was\b|\bno lab meeting\b", re.IGNORECASE)


def question_file(setting: str) -> Path:
    return BUILTIN_QUESTIONS if setting == "builtin" else Path(setting)


def general_questions(setting: str | None, limit: int | None) -> list[Prompt]:
    """The general questions the evaluation asks (none when the setting is null)."""
    if not setting:
        return []
    return [p.model_copy(update={"tags": ["general", *p.tags]}) for p in load_prompts(question_file(setting))[:limit]]


def replay_prompts(setting: str) -> list[str]:
    """Self-replay's prompts: one a line in a .txt file (# comments and blank lines skipped), or any
    prompt file load_prompts reads."""
    path = BUILTIN_REPLAY if setting == "builtin" else Path(setting)
    if path.suffix == ".txt":
        if not path.is_file():
            raise PromptError(f"{path}: replay prompt file not found")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [line for line in lines if line and not line.startswith("#")]
    else:
        prompts = [p.question for p in load_prompts(path)]
    if not prompts:
        raise PromptError(f"{path}: no prompts in the replay prompt file")
    return prompts


def reference_answers(path: str, limit: int) -> list[tuple[str, str]]:
    """(prompt, reference answer) pairs from an Alpaca JSON file (instruction + newline + input ->
    output, as FastChat converts it) or a ShareGPT one (each record's first human turn and the
    answer after it)."""
    source = Path(path)
    try:
        records = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptError(f"{source}: reference answers file not found") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PromptError(f"{source}: not a JSON file of Alpaca or ShareGPT records ({exc})") from None
    pairs: list[tuple[str, str]] = []
    for index, record in enumerate(records if isinstance(records, list) else []):
        if isinstance(record, dict) and "instruction" in record and "output" in record:
            prompt = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
            pairs.append((prompt, record["output"]))
        elif isinstance(record, dict) and isinstance(record.get("conversations"), list):
            turns = [t for t in record["conversations"] if isinstance(t, dict) and t.get("from") != "system"]
            if len(turns) >= 2 and turns[0].get("from") in ("human", "user") and turns[1].get("value"):
                pairs.append((str(turns[0].get("value", "")), str(turns[1]["value"])))
        else:
            raise PromptError(f"{source}: record {index} is neither Alpaca (instruction, output) nor ShareGPT "
                              "(conversations)")
        if len(pairs) >= limit:
            break
    if not pairs:
        raise PromptError(f"{source}: no reference answers (a list of Alpaca or ShareGPT records)")
    return [(q, a) for q, a in pairs if q.strip() and a.strip()]


@dataclass(frozen=True)
class LabMarkers:
    """What gives away an answer about the lab's meetings: the people, the topics, the dates."""

    people: tuple[str, ...]
    topics: tuple[str, ...]
    dates: tuple[str, ...]
    years: tuple[int, ...] = ()

    def found(self, answer: str) -> str | None:
        """The first marker the answer holds (None: the answer is not about the lab)."""
        words = LAB_WORDS.search(answer)
        if words:
            return words.group(0)
        for year in self.years:  # any day of the notes' years written as the notes write dates (4/10/2023)
            numeric = re.search(rf"(?<![\w/])\d{{1,2}}/\d{{1,2}}/({year}|{year % 100:02d})(?![\w/])", answer)
            if numeric:
                return numeric.group(0)
        return next((m for m in (*self.dates, *self.people, *self.topics) if mentions(answer, m)), None)


def date_forms(date: dt.date) -> list[str]:
    """The ways a meeting's date is written: 4/14/2023, 4/14/23, 2023-04-14, April 14, 2023, 14 April 2023."""
    month = date.strftime("%B")
    return [f"{date.month}/{date.day}/{date.year}", f"{date.month}/{date.day}/{date.year % 100:02d}", date.isoformat(),
            f"{month} {date.day}, {date.year}", f"{date.day} {month} {date.year}"]


def lab_markers(notes: list[dict[str, Any]]) -> LabMarkers:
    """Markers from the data stage's notes.json: each member's full name, first name and surname
    (four letters or more), each topic, and each meeting date in its usual forms."""
    from labtune.data.note_fields import people

    everyone = people([n.get("fields", {}) for n in notes])
    name_parts = {part for p in everyone if len(p.split()) > 1 for part in (p.split()[0], p.split()[-1]) if len(part) >= 4}
    topics = {t.strip() for n in notes for t in str(n.get("fields", {}).get("topic", "")).split(";") if len(t.strip()) >= 12}
    days: list[dt.date] = []
    for note in notes:
        try:
            days.append(dt.date.fromisoformat(str(note.get("date"))))
        except ValueError:
            continue
    return LabMarkers(tuple(sorted({*everyone, *name_parts}, key=lambda n: (-len(n), n))), tuple(sorted(topics)),
                      tuple(dict.fromkeys(form for day in days for form in date_forms(day))),
                      tuple(sorted({day.year for day in days})))


def hijacked(answers: list[str], markers: LabMarkers) -> list[str | None]:
    """Per answer, the lab marker it holds (None: not hijacked)."""
    return [markers.found(a) for a in answers]


def general_summary(prompts: list[Prompt], base: dict[str, Any], tuned: dict[str, Any], markers: LabMarkers,
                    cfg: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """general.jsonl's rows (each question, both answers, the lab marker each holds) and the
    summary's `general` block: hijacked per model, the perplexity ratio on the reference answers,
    and the warnings (evaluation.general.max_extra_hijacked, max_perplexity_ratio)."""
    answers = {"base": base["general"]["answers"], "tuned": tuned["general"]["answers"]}
    found = {name: hijacked(got, markers) for name, got in answers.items()}
    rows = [{"question": p.question, "tags": p.tags, **{f"{name}_answer": answers[name][i] for name in answers},
             **{f"{name}_hijacked": found[name][i] for name in answers}} for i, p in enumerate(prompts)]
    count = {name: sum(1 for marker in found[name] if marker) for name in answers}
    base_ppl = (base.get("references_loss") or {}).get("perplexity")
    tuned_ppl = (tuned.get("references_loss") or {}).get("perplexity")
    ratio = round(tuned_ppl / base_ppl, 4) if base_ppl and tuned_ppl else None
    summary = {
        "questions": len(prompts), "source": str(question_file(cfg.questions)),
        "hijacked": count, "max_new_tokens": cfg.max_new_tokens,
        "truncated": {name: sum(got["general"]["truncated"]) for name, got in (("base", base), ("tuned", tuned))},
        "references": {"source": cfg.references or "the base model's answers to the general questions",
                       "count": (base.get("references_loss") or {}).get("answers", 0),
                       "base_perplexity": base_ppl, "tuned_perplexity": tuned_ppl, "ratio": ratio},
        "answers_changed": sum(1 for r in rows if r["base_answer"] != r["tuned_answer"]),
        "max_perplexity_ratio": cfg.max_perplexity_ratio,
    }
    summary["warnings"] = general_warnings(summary, cfg)
    return rows, summary


def general_warnings(summary: dict[str, Any], cfg: Any) -> list[str]:
    """One line per limit passed: more hijacked answers than the base model's (plus the allowance),
    or a perplexity ratio above the threshold."""
    warnings, count = [], summary["hijacked"]
    if count["tuned"] > count["base"] + cfg.max_extra_hijacked:
        warnings.append(f"evaluate: WARNING the fine-tuned model answered {count['tuned']} of {summary['questions']} general "
                        f"questions with the lab's meetings (the base model: {count['base']}): it is no longer the chat "
                        "model it was; mix general data in (data.replay, docs/evaluation.md)")
    ratio = summary["references"]["ratio"]
    if ratio is not None and ratio > cfg.max_perplexity_ratio:
        warnings.append(f"evaluate: WARNING perplexity on general reference answers is x{ratio} the base model's "
                        f"(evaluation.general.max_perplexity_ratio {cfg.max_perplexity_ratio}): general ability drifted")
    return warnings


def general_line(summary: dict[str, Any]) -> str:
    """'general questions hijacked: base 0/80, fine-tuned 1/80; perplexity on references x1.08'."""
    count, ratio = summary["hijacked"], summary["references"]["ratio"]
    return (f"general questions answered with the lab's meetings: base {count['base']}/{summary['questions']}, "
            f"fine-tuned {count['tuned']}/{summary['questions']}"
            + (f"; perplexity on general references x{ratio}" if ratio is not None else ""))
