"""Prompts and scoring, without torch: prompt files (their entries are the recipe's `Prompt`, what
`evaluation.questions` holds), the scorer, and accuracy per tag.

A prompt file is YAML or JSON: a list of entries (or `{prompts: [...]}`), each
`{question, expected?, regex?, tags?}`. `expected` is a substring or a list of acceptable
substrings (case-insensitive); `regex` is searched case-insensitively. Vicuna-bench question
files (JSONL of `{question_id, category, turns}`) load too, their category as the tag.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from labtune.data.words import mentions
from labtune.errors import LabtuneError, yaml_error
from labtune.recipe import Prompt  # the schema lives with the recipe, whose evaluation.questions hold it


class PromptError(LabtuneError, ValueError):
    """A prompt file or entry is malformed; the message names the file and the entry."""


def score(answer: str, prompt: Prompt) -> bool | None:
    """Correct when the answer mentions one of the expected strings, every string of
    expected_all, or the regex matches, and mentions none of the forbidden ones (an answer naming
    the right person and another person from the notes is wrong, and so is one that lists every
    date); whole words, case-insensitive. None when the prompt states no expectation."""
    if not prompt.scored:
        return None
    options = [] if prompt.expected is None else [prompt.expected] if isinstance(prompt.expected, str) else prompt.expected
    # A forbidden name inside an expected one ("priya" in "Priya Nair") cannot be avoided by a right answer.
    inside = [*options, *(prompt.expected_all or [])]
    if any(mentions(answer, name) for name in prompt.forbidden if not any(mentions(o, name) for o in inside)):
        return False
    if prompt.expected_all and all(mentions(answer, part) for part in prompt.expected_all):
        return True
    if any(mentions(answer, option) for option in options):
        return True
    if prompt.regex is not None and re.search(prompt.regex, answer, re.IGNORECASE):
        return True
    return False


def paired(correct: list[bool | None], prompts: list[Prompt]) -> list[bool | None]:
    """Each prompt's score, a pair's members right only when every member of the pair is."""
    together: dict[str, bool] = {}
    for ok, prompt in zip(correct, prompts):
        if prompt.pair is not None:
            together[prompt.pair] = together.get(prompt.pair, True) and bool(ok)
    return [together[p.pair] if p.pair is not None and ok is not None else ok for ok, p in zip(correct, prompts)]


def _entry_name(index: int, entry: Any) -> str:
    if isinstance(entry, dict) and entry.get("id") is not None:
        return f"entry {index} (id {entry['id']!r})"
    return f"entry {index}"


def load_prompts(path: str | Path, default_tag: str | None = None) -> list[Prompt]:
    """A prompt file (YAML, JSON, or Vicuna-bench JSONL); a malformed entry fails naming it."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"{path}: prompt file not found")
    text = path.read_text()
    if path.suffix == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PromptError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
    else:
        try:
            entries = yaml.safe_load(text)  # JSON is YAML
        except yaml.YAMLError as exc:
            raise PromptError(yaml_error(path, exc)) from None
        if isinstance(entries, dict) and "prompts" in entries:
            entries = entries["prompts"]
    if not isinstance(entries, list):
        raise PromptError(f"{path}: expected a list of prompts (or a mapping with `prompts:`)")
    prompts = []
    for index, entry in enumerate(entries):
        if isinstance(entry, dict) and "turns" in entry and "question" not in entry:  # Vicuna-bench
            turns = entry.get("turns")
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                raise PromptError(f"{path}: {_entry_name(index, entry)}: `turns` must be a non-empty list of strings")
            entry = {"question": turns[0], "id": str(entry.get("question_id", index)),
                     "tags": [str(entry["category"])] if entry.get("category") else []}
        if not isinstance(entry, dict):
            raise PromptError(f"{path}: {_entry_name(index, entry)}: expected a mapping with `question`, got {type(entry).__name__}")
        try:
            prompt = Prompt(**entry)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(p) for p in error["loc"]) or "entry"
            message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
            raise PromptError(f"{path}: {_entry_name(index, entry)}: {field}: {message}") from None
        if default_tag and default_tag not in prompt.tags:
            prompt.tags.append(default_tag)
        prompts.append(prompt)
    return prompts


def accuracy(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """{"overall": (correct, total), "by_tag": {tag: (correct, total)}} over the scored rows."""
    def tally(selected: list[dict[str, Any]]) -> dict[str, Any]:
        scored = [r for r in selected if r[key] is not None]
        correct = sum(1 for r in scored if r[key])
        return {"correct": correct, "total": len(scored), "accuracy": round(correct / len(scored), 4) if scored else None}

    tags = sorted({t for r in rows for t in r.get("tags", [])})
    return {"overall": tally(rows), "by_tag": {t: tally([r for r in rows if t in r.get("tags", [])]) for t in tags}}

