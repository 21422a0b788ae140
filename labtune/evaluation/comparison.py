"""Runs side by side: what differs between their recipes, and one table of their scores
(`labtune compare`, the sweep flow).
"""

from __future__ import annotations

import json
from typing import Any


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for index, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}.{index}"))
        return out
    return {prefix: value}


def recipe_differences(recipes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each recipe, the dotted keys whose values differ between the recipes (what makes the
    runs different: data mix, epochs ...)."""
    flat = [_flatten(r) for r in recipes]
    keys = sorted(set().union(*flat)) if flat else []
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    skip = ("store.", "name")
    return [{k: f.get(k) for k in differing if not k.startswith(skip)} for f in flat]


def run_label(difference: dict[str, Any], fallback: str) -> str:
    return ", ".join(f"{k}={v}" for k, v in difference.items()) or fallback


def comparison_table(runs: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """runs: [{"uri", "recipe", "rows"}]. Returns (column labels, one row per question): the
    question, expected, the base model's answer (from the first run) and each run's answer with
    ✓/✗."""
    labels = []
    for index, (run, diff) in enumerate(zip(runs, recipe_differences([r["recipe"] for r in runs]))):
        labels.append(run_label(diff, f"run {index + 1}"))
    table: dict[str, dict[str, Any]] = {}
    for run_index, run in enumerate(runs):
        for row in run["rows"]:
            entry = table.setdefault(row["question"], {"question": row["question"], "expected": expected_text(row)})
            entry.setdefault("base", row["base_answer"])
            mark = {True: "✓ ", False: "✗ ", None: ""}[row["tuned_correct"]]
            entry[labels[run_index]] = mark + row["tuned_answer"]
    return labels, list(table.values())


def expected_text(row: dict[str, Any]) -> str:
    expected = row.get("expected")
    text = " | ".join(expected) if isinstance(expected, list) else (expected or "")
    if row.get("expected_all"):
        text = (text + " " if text else "") + " & ".join(row["expected_all"])
    if row.get("regex"):
        text = f"{text} /{row['regex']}/".strip()
    return text


def markdown_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return str("" if value is None else value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
