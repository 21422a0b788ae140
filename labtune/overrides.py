"""Dotted `key=value` overrides of a recipe (FastChat's and HF's names), a sweep's grid of them, and
the YAML loader that refuses a key given twice."""

from __future__ import annotations

import itertools
from typing import Any

import yaml

from labtune.errors import RecipeError


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.num_train_epochs=5` -> (["train", "num_train_epochs"], 5); the value is YAML."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected dotted key=value, e.g. train.num_train_epochs=5")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip():
        raise RecipeError(f"override {text!r}: empty key")
    if not all(part.strip() for part in parts):  # train..learning_rate is a typo, not train.learning_rate
        raise RecipeError(f"override {text!r}: empty part in the key {key.strip()!r} (two dots, or a dot at an end)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return parts, value


# keys read under another name: FastChat's spelling -> where labtune keeps it
ALIASES = {("train", "model_max_length"): ["data", "model_max_length"]}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        parts = ALIASES.get(tuple(parts), parts)
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = _list_item(node, part, text)
                continue
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise RecipeError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a mapping")
        if isinstance(node, list):
            index = int(parts[-1]) if parts[-1].isdigit() else None
            if index is None or index >= len(node):
                raise RecipeError(f"override {text!r}: no list item {parts[-1]}")
            node[index] = value
        else:
            node[parts[-1]] = value
    return raw


def _list_item(node: list, part: str, text: str) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"override {text!r}: no list item {part}")
    return node[int(part)]


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error naming both lines
    (PyYAML itself keeps the last one in silence)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: PyYAML's own error says so
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (lines {first} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def grid_variants(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a sweep grid's values ({key: [values]}), in the grid's order."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
