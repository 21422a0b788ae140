"""One file, many meetings: a running meeting log or a document export split at its dated headings.

A heading is a Markdown `#` heading, an Org `*` heading (in .org files), a setext heading (a line
over `===` or `---`), a MediaWiki `== ... ==` line, a line that is bold and nothing else, or a line
that is a date and nothing else ("Fri 14 April 2023"). A dated heading is one whose text holds a
full date (labtune.data.note_dates) and does not announce another event ("Next meeting: 5/19/2023",
"Deadline 6/1/2023"). The dated headings at the outermost level that has any split the file:
each meeting runs from its heading to the next one, newest first or last alike; text before the
first belongs to no meeting. Pages pasted one after another, each under an undated heading with
its own `Date:` line, split at those lines' headings. A file with one dated heading is one
meeting, read as before (its date may then also come from a Date: line or the file name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from labtune.data.note_dates import CANDIDATES, FoundDate, first_date

_ATX = re.compile(r"^\s{0,3}(?P<marks>#{1,6})\s+(?P<text>.+?)\s*#*\s*$")
_ORG = re.compile(r"^(?P<marks>\*{1,8})\s+(?P<text>.+?)\s*$")
_WIKI = re.compile(r"^\s*(?P<marks>={1,6})\s*(?P<text>[^=].*?)\s*(?P=marks)\s*$")
_BOLD = re.compile(r"^\s*(?:\*\*|__)(?P<text>[^*_].*?)(?:\*\*|__)\s*:?\s*$")
_SETEXT = re.compile(r"^\s*(?P<marks>=+|-+)\s*$")
# headings that date something other than the meeting they open
_NOT_A_MEETING = re.compile(r"^\W*(?:next|upcoming|previous|last|following|due|deadline|reminder|re:|fwd?:)\b",
                            re.IGNORECASE)


@dataclass(frozen=True)
class Section:
    start: int  # index of the heading line
    end: int  # index one past the section's last line
    date: FoundDate
    level: int


def headings(lines: list[str], org: bool) -> list[tuple[int, int, str]]:
    """(line index, level, text) of every heading; lower levels are outer."""
    found = []
    for index, line in enumerate(lines):
        if org:
            match = _ORG.match(line)
            if match:
                found.append((index, len(match.group("marks")), match.group("text")))
            continue
        match = _ATX.match(line)
        if match:
            found.append((index, len(match.group("marks")), match.group("text")))
            continue
        match = _WIKI.match(line)
        if match:
            found.append((index, len(match.group("marks")), match.group("text")))
            continue
        following = lines[index + 1] if index + 1 < len(lines) else ""
        setext = _SETEXT.match(following)
        if line.strip() and setext and len(setext.group("marks")) >= 3 and not line.lstrip().startswith(("-", "*", "|")):
            found.append((index, 1 if setext.group("marks")[0] == "=" else 2, line.strip()))
            continue
        match = _BOLD.match(line)
        if match:
            found.append((index, 7, match.group("text")))
            continue
        if _date_only(line):
            found.append((index, 8, line.strip()))
    return found


def _date_only(line: str) -> bool:
    """A line that holds a date and at most a word or two around it ("Meeting 4/14/2023:")."""
    match = CANDIDATES.search(line)
    if not match:
        return False
    before = line[: match.start()].strip()
    if before.endswith(":"):  # "Date: 2023-06-02" is a field line, not a heading
        return False
    rest = (before + " " + line[match.end():]).strip(" \t:-–—*_()[]#,.")
    return len(rest.split()) <= 2 and not any(c.isdigit() for c in rest)


def meeting_sections(text: str, order: str = "MDY", org: bool = False,
                     date_lines: list[tuple[int, FoundDate]] = ()) -> list[Section]:
    """The meetings of a file, one per dated heading at the outermost dated level (see above);
    `date_lines` are the file's Date: field lines (line index, date), for pages pasted together."""
    lines = text.splitlines()
    dated = []
    found_headings = headings(lines, org)
    for index, level, heading in found_headings:
        if _NOT_A_MEETING.match(heading):
            continue
        found = first_date(heading, order)
        if found:
            dated.append((index, level, found))
    if len({d.date for _, d in date_lines}) >= 2 and len(dated) < 2:
        return _split_at_date_lines(lines, found_headings, list(date_lines))
    if not dated:
        return []
    outer = min(level for _, level, _ in dated)
    starts = [(index, found) for index, level, found in dated if level == outer]
    return [Section(index, starts[i + 1][0] if i + 1 < len(starts) else len(lines), found, outer)
            for i, (index, found) in enumerate(starts)]


def _split_at_date_lines(lines: list[str], found_headings: list[tuple[int, int, str]],
                         date_lines: list[tuple[int, FoundDate]]) -> list[Section]:
    """Pages pasted one after another: each Date: line opens a meeting at the heading just above
    it (after the previous Date: line), or at the line itself."""
    starts, previous = [], -1
    for index, found in date_lines:
        above = [h for h, _, _ in found_headings if previous < h < index]
        start = above[-1] if above else index
        starts.append((start, found))
        previous = index
    return [Section(start, starts[i + 1][0] if i + 1 < len(starts) else len(lines), found, 0)
            for i, (start, found) in enumerate(starts)]
