"""Schedules: a sheet whose rows are meetings (.csv, .tsv, .xlsx, or a Markdown table in a note
file). Imports the standard library and, for .xlsx, openpyxl.

The header row names the columns under the words labs use for note fields (date / when, presenter /
speaker, topic / title, recorder / minutes ...: labtune.data.notes.FIELD_WORDS and a recipe's
data.field_names); a sheet without a date column, or with nothing but dates, is not a schedule.
Each row becomes "Header: value" lines and is read like any note, so the same names, dates and
checks apply; its facts keep the row's line. labtune.data.conversations merges a row into the
note of the same date (see merge_schedules).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

SCHEDULE_SUFFIXES = (".csv", ".tsv", ".xlsx")


def sheet_rows(path: Path) -> list[list[str]]:
    """The sheet's rows as text (the first worksheet of an .xlsx); ValueError when unreadable."""
    if path.suffix.lower() == ".xlsx":
        import openpyxl

        try:
            book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        except Exception:  # openpyxl raises zipfile, KeyError and its own errors for a damaged book
            raise ValueError("not a readable .xlsx file (damaged, or another format under that name)") from None
        sheet = book.worksheets[0]
        rows = [["" if v is None else (v.date().isoformat() if hasattr(v, "date") else str(v)) for v in row]
                for row in sheet.iter_rows(values_only=True)]
        book.close()
        return rows
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start})") from None
    delimiter = "\t" if path.suffix.lower() == ".tsv" else _delimiter(text)
    return [row for row in csv.reader(io.StringIO(text), delimiter=delimiter)]


def _delimiter(text: str) -> str:
    try:
        return csv.Sniffer().sniff(text[:4096], delimiters=",;\t").delimiter
    except csv.Error:
        return ","


def schedule_rows(path: Path, canonical: dict[str, str]) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(the header, [(line, row)]) of a schedule; ValueError naming what is missing when the sheet
    has no header row with a date column and another field's column."""
    rows = sheet_rows(path)
    for index, row in enumerate(rows[:10]):  # a title row or two may stand above the header
        if is_header(row, canonical):
            return row, [(index + 2 + n, r) for n, r in enumerate(rows[index + 1:]) if any(c.strip() for c in r)]
    columns = ", ".join(c for c in (rows[0] if rows else []) if c) or "none"
    raise ValueError(f"not a schedule: no header row with a date column and a presenter, topic or other field's "
                     f"column (columns: {columns})")


def is_header(row: list[str], canonical: dict[str, str]) -> bool:
    """A date column and another field's column, under the names notes use."""
    keys = [canonical.get(" ".join(cell.lower().replace("_", " ").replace("-", " ").split()), "") for cell in row]
    return "date" in keys and any(k and k != "date" for k in keys)


def markdown_schedule(text: str, canonical: dict[str, str]) -> tuple[list[str], list[tuple[int, list[str]]]] | None:
    """A note file's Markdown table whose header has a date column and another field's, with at least
    two rows below it: (the header, [(line, row)]); None for any other note (a two-column field
    table "| Date | 2023-03-10 |" is a note's fields, not a schedule)."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if not line.lstrip().startswith("|"):
            continue
        header = _cells(line)
        if not is_header(header, canonical):
            continue
        rows = []
        for number, row in enumerate(lines[index + 1:], index + 2):
            if not row.lstrip().startswith("|"):
                break
            cells = _cells(row)
            if not all(set(c) <= set("-: ") for c in cells):  # the |---|---| line
                rows.append((number, cells))
        return (header, rows) if len(rows) >= 2 else None
    return None


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]
