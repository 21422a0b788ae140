"""Meeting dates as people write them, read by python-dateutil.

A short pattern only finds where a date may stand in a line (numbers with separators, eight
digits, or a month name with a day and a year); python-dateutil reads each candidate, and a
candidate counts only when it names a year, a month and a day (it is parsed against two
different default dates and must give the same one both times). Forms read: 2023-03-10,
2023.03.10, 2023/03/10, 20230310, 3/10/2023, 3/10/23, 10.3.2023, March 10, 2023, Mar 10 '23,
Fri 10 Mar 2023, the 10th of March 2023, <2023-03-10 Fri>, in any case.

Day and month order: a year first is always year-month-day, and dots without a year first are
day-month-year (10.3.2023); otherwise `order` (MDY, the default, or DMY) decides, and a date that reads differently under the other order is returned
with that other reading, so that the data report can name it once.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass

from dateutil import parser as date_parser

_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_WEEKDAY = r"(?:mon|tue|tues|wed|thu|thur|thurs|fri|sat|sun)[a-z]*\.?,?"
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_YEAR = r"(?:\d{4}|'\d{2})"
CANDIDATES = re.compile(
    r"(?<![\d.])(?:"
    r"(?P<ymd>\d{4}[-/.]\d{1,2}[-/.]\d{1,2})"  # 2023-03-10, 2023.03.10, 2023/03/10
    r"|(?P<compact>(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))"  # 20230310
    r"|(?P<numeric>\d{1,2}[-/.]\d{1,2}[-/.](?:\d{4}|\d{2}))"  # 3/10/2023, 10.3.2023, 3/10/23
    rf"|(?P<text>(?:{_WEEKDAY}\s+)?(?:(?:the\s+)?{_DAY}\s+(?:of\s+)?{_MONTH},?\s+{_YEAR}"
    rf"|{_MONTH}\s+{_DAY},?\s+{_YEAR}))"
    r")(?![\d])",
    re.IGNORECASE,
)
_DEFAULTS = (dt.datetime(1901, 1, 1), dt.datetime(1902, 2, 2))


@dataclass(frozen=True)
class FoundDate:
    date: dt.date
    text: str  # as written
    other_reading: dt.date | None = None  # the date under the other day/month order, when it differs


def _read(text: str, dayfirst: bool, yearfirst: bool) -> dt.date | None:
    try:
        first, second = (date_parser.parse(text.replace("'", ""), default=d, dayfirst=dayfirst, yearfirst=yearfirst)
                         for d in _DEFAULTS)
    except (ValueError, OverflowError):
        return None
    return first.date() if first == second else None


def _plain_words(text: str) -> str:
    """What dateutil reads of a written date: "the 14th of April '23" -> "14th April 2023"."""
    text = re.sub(r"\b(?:the|of)\s+", "", text, flags=re.IGNORECASE)
    return re.sub(r"'(\d{2})\b", r"20\1", text)


def find_dates(line: str, order: str = "MDY") -> list[FoundDate]:
    """Every full date (year, month and day) written in a line, in the order they stand."""
    return list(_dates(line, order))


def _dates(line: str, order: str) -> Iterator[FoundDate]:
    """The full dates of a line, read as the scan reaches them (first_date stops at the first: a
    20 MB note on one line is not scanned to its end for its heading's date)."""
    for match in CANDIDATES.finditer(line):
        text = match.group(0).strip()
        if match.group("ymd") or match.group("compact"):
            date = _read(text.replace(".", "-").replace("/", "-") if match.group("ymd") else text, False, True)
            other = None
        elif match.group("numeric") and "." in text:  # 10.3.2023: dots are the day-first form
            date, other = _read(text, True, False), None
        elif match.group("numeric"):
            date = _read(text, order == "DMY", False)
            flipped = _read(text, order != "DMY", False)
            other = flipped if flipped and flipped != date else None
        else:
            date, other = _read(_plain_words(text), order == "DMY", False), None
        if date is not None:
            yield FoundDate(date, text, other)


def impossible_date(line: str, order: str = "MDY") -> str | None:
    """The first thing written as a full date that no calendar holds ("Feb 30, 2023", "31/31/2023",
    "2023-02-30"): named in the report instead of "no date"."""
    for match in CANDIDATES.finditer(line):
        text = match.group(0).strip()
        if not find_dates(text, order) and not find_dates(text, "DMY" if order == "MDY" else "MDY"):
            return text
    return None


def first_date(line: str, order: str = "MDY") -> FoundDate | None:
    return next(_dates(line, order), None)


ID_IN_NAME = re.compile(r"[0-9a-fA-F]{32}|[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def date_in_name(stem: str, order: str = "MDY") -> FoundDate | None:
    """A date in a file name ("2023-03-10", "20230310", "07-03-2023", "lab_2023_03_10"); an id in the
    name (Notion's 32 hex digits, a UUID) is never read as one ("...2023091512ab...")."""
    return first_date(re.sub(r"[_]", "-", ID_IN_NAME.sub(" ", stem)), order)
