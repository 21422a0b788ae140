"""Minutes sent by e-mail (.eml) as a note. Imports only the standard library.

The Subject becomes the note's first heading, so a date there ("Lab meeting minutes 9/22/2023") is
the meeting's; a Date:/When: line in the body still comes first, as in any note (labtune.data.notes).
When neither names a date, the message's Date: header does (the day the minutes were sent). The
body is the text/plain part, or the text of the HTML part when there is none; a reply's quoted
message ("On Fri, Sep 22, 2023 at 5:01 PM Ana wrote:", "-----Original Message-----", "> " lines)
is cut, so a thread's minutes are read once. The sender is the recorder when the body names none
(the one who sends the minutes is usually the one who took them), when the From: header gives a
person's name (two to four words; a list address or a bare address gives none): `EmailNote.sender`.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import email.utils
import re
from dataclasses import dataclass
from html.parser import HTMLParser

QUOTE_START = re.compile(r"^\s*(On\s.{4,200}\swrote:|-{2,}\s*(Original|Forwarded) Message\s*-{2,}|From:\s.+@.+)\s*$",
                         re.IGNORECASE)


@dataclass
class EmailNote:
    text: str  # "# Subject" then the body, quoted replies cut
    sent: dt.date | None  # the Date: header's day
    sender: str | None  # the From: header's display name, when it is a person's
    reply: bool = False  # the Subject starts "Re:" (or "Fwd:")


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4"):
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def html_text(html: str) -> str:
    """The text of an HTML body, a line per paragraph, list item or table row."""
    parser = _Text()
    parser.feed(html)
    return re.sub(r"\n\s*\n+", "\n\n", "".join(parser.parts)).strip()


def unquoted(body: str) -> str:
    """The body down to the first quoted message; "> " lines dropped."""
    kept = []
    for line in body.splitlines():
        if QUOTE_START.match(line):
            break
        if not line.lstrip().startswith(">"):
            kept.append(line.rstrip())
    return "\n".join(kept).strip()


def read_email(raw: bytes) -> EmailNote:
    """An .eml file's note; ValueError when it holds no text."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    part = message.get_body(preferencelist=("plain", "html"))
    if part is None:
        raise ValueError("an e-mail with no text part")
    try:
        body = part.get_content()
    except (LookupError, UnicodeError):  # a charset Python does not know, or bytes that are not in it
        body = (part.get_payload(decode=True) or b"").decode("utf-8", errors="replace")
    if part.get_content_subtype() == "html":
        body = html_text(body)
    body = unquoted(body)
    raw_subject = str(message["subject"] or "")
    subject = re.sub(r"^\s*((re|fwd?|aw|wg)\s*:\s*)+", "", raw_subject, flags=re.IGNORECASE).strip()
    if not body and not subject:
        raise ValueError("an e-mail with no subject and an empty body")
    sent = None
    try:
        sent = email.utils.parsedate_to_datetime(str(message["date"])).date() if message["date"] else None
    except (TypeError, ValueError):
        pass
    name = email.utils.parseaddr(str(message["from"] or ""))[0].strip().strip('"')
    person = re.fullmatch(r"[^\W\d_][\w.'-]*(\s[^\W\d_][\w.'-]*){1,3}", name)  # "Ana Souza", not "lab-list" or an address
    return EmailNote(f"# {subject}\n\n{body}" if subject else body, sent, name if person else None,
                     reply=subject != raw_subject.strip())
