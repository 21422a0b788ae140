"""One file, many meetings: a running meeting log or a document export split at its dated headings.

A heading is a Markdown `#` heading, an Org `*` heading (in .org files), a setext heading (a line
over `===` or `---`), a MediaWiki `== ... ==` line or a line that is bold and nothing else. A dated
heading is one whose text holds a full date (labtune.note_dates) and does not announce another
event ("Next meeting: 5/19/2023", "Deadline 6/1/2023"). The dated headings at the outermost level
that has any split the file: each meeting runs from its heading to the next one, newest first or
last alike; text before the first belongs to no meeting. A file with one dated heading is one
meeting, read as before (its date may then also come from a Date: line or the file name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from labtune.note_dates import FoundDate, first_date

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
    return found


def meeting_sections(text: str, order: str = "MDY", org: bool = False) -> list[Section]:
    """The meetings of a file, one per dated heading at the outermost dated level (see above)."""
    lines = text.splitlines()
    dated = []
    for index, level, heading in headings(lines, org):
        if _NOT_A_MEETING.match(heading):
            continue
        found = first_date(heading, order)
        if found:
            dated.append((index, level, found))
    if not dated:
        return []
    outer = min(level for _, level, _ in dated)
    starts = [(index, found) for index, level, found in dated if level == outer]
    return [Section(index, starts[i + 1][0] if i + 1 < len(starts) else len(lines), found, outer)
            for i, (index, found) in enumerate(starts)]
