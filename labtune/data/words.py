"""Whole-word matching: the one rule by which the scorer reads an answer and the data stage
checks what a question or a note already says."""

from __future__ import annotations

import re


def mentions(text: str, phrase: str) -> bool:
    """`phrase` in `text` as whole words, case-insensitively: "1/1/2023" is not in "11/1/2023",
    "Ann" is not in "Anna"."""
    phrase = phrase.strip()
    return bool(phrase) and re.search(rf"(?<![\w/]){re.escape(phrase)}(?![\w/])", text, re.IGNORECASE) is not None
