"""Documents as labs export them (.docx from Word or Google Docs, .pdf, .pptx, .html) read as
Markdown through Microsoft's markitdown, then like any note (labtune.data.notes). markitdown has no
OpenDocument reader: an .odt (LibreOffice, or Google Docs' other export) is read here from its
content.xml with the standard library, headings, paragraphs and tables in document order.

markitdown is one well-kept converter for all of them, installs from PyPI and downloads nothing
at run time; a Word table becomes a Markdown table, whose "| Presenter | Sven Lindqvist |" rows
read as field lines. A document that cannot be converted (a password-protected PDF, a damaged
file) is skipped with one line naming the reason.
"""

from __future__ import annotations

import re
import zipfile
import xml.etree.ElementTree as ElementTree
from functools import lru_cache
from pathlib import Path
from typing import Any

CONVERTED_SUFFIXES = (".docx", ".pdf", ".pptx", ".html", ".htm", ".odt")
# what a file must hold to be what its name says: markitdown would read anything else as plain text
ZIP_MEMBER = {".docx": "word/document.xml", ".pptx": "ppt/presentation.xml", ".odt": "content.xml"}
_TEXT = "{urn:oasis:names:tc:opendocument:xmlns:text:1.0}"
_TABLE = "{urn:oasis:names:tc:opendocument:xmlns:table:1.0}"


@lru_cache(maxsize=1)
def _converter() -> Any:
    from markitdown import MarkItDown

    return MarkItDown(enable_plugins=False)


def document_text(path: Path) -> str:
    """The document as Markdown; ValueError with a short reason when it cannot be read."""
    suffix = path.suffix.lower()
    with path.open("rb") as handle:
        head = handle.read(5)
    member = ZIP_MEMBER.get(suffix)
    if member and not (zipfile.is_zipfile(path) and member in zipfile.ZipFile(path).namelist()) \
            or suffix == ".pdf" and head != b"%PDF-":
        raise ValueError(f"not a readable {suffix} file (damaged, or another format under that name)")
    if suffix == ".odt":
        try:
            return odt_markdown(zipfile.ZipFile(path).read("content.xml"))
        except (ElementTree.ParseError, ValueError):  # defusedxml refuses entities with its own ValueError subclasses
            raise ValueError("not a readable .odt file (damaged, or another format under that name)") from None
    try:
        return _converter().convert_local(str(path)).text_content or ""
    except Exception as exc:  # markitdown wraps each converter's own error
        raise ValueError(_reason(path, exc)) from None


def _reason(path: Path, exc: BaseException) -> str:
    chain = []
    while exc is not None and len(chain) < 6:
        chain.append(f"{type(exc).__name__} {exc}")
        exc = exc.__cause__ or exc.__context__
    said = " ".join(chain).lower()
    if "password" in said or "encrypt" in said:
        return f"password-protected {path.suffix.lower().lstrip('.').upper()}: not read"
    return f"not a readable {path.suffix.lower()} file (damaged, or another format under that name)"


def odt_markdown(content: bytes) -> str:
    """An OpenDocument text's headings ("# ..."), paragraphs and tables ("| a | b |") as Markdown."""
    lines: list[str] = []

    def text_of(element: ElementTree.Element) -> str:
        return re.sub(r"\s+", " ", "".join(element.itertext())).strip()

    def walk(element: ElementTree.Element) -> None:
        for child in element:
            if child.tag == f"{_TEXT}h":
                level = int(child.get(f"{_TEXT}outline-level", "1"))
                lines.extend(["", f"{'#' * min(level, 6)} {text_of(child)}", ""])
            elif child.tag == f"{_TEXT}p":
                lines.append(text_of(child))
            elif child.tag == f"{_TABLE}table":
                rows = [[text_of(cell) for cell in row.iter(f"{_TABLE}table-cell")] for row in child.iter(f"{_TABLE}table-row")]
                lines.extend([""] + [f"| {' | '.join(row)} |" for row in rows] + [""])
            elif child.tag == f"{_TEXT}list":
                lines.extend(f"- {text_of(item)}" for item in child.iter(f"{_TEXT}list-item"))
            else:
                walk(child)

    from defusedxml.ElementTree import fromstring  # a document's XML may declare entities: never expand them

    walk(fromstring(content))
    return "\n".join(lines).strip()
