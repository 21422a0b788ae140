"""Documents as labs export them (.docx from Word or Google Docs, .pdf, .pptx, .html) read as
Markdown through Microsoft's markitdown, then like any note (labtune.data.notes).

markitdown is one well-kept converter for all of them, installs from PyPI and downloads nothing
at run time; a Word table becomes a Markdown table, whose "| Presenter | Sven Lindqvist |" rows
read as field lines. A document that cannot be converted (a password-protected PDF, a damaged
file) is skipped with one line naming the reason.
"""

from __future__ import annotations

import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

CONVERTED_SUFFIXES = (".docx", ".pdf", ".pptx", ".html", ".htm")
# what a file must hold to be what its name says: markitdown would read anything else as plain text
ZIP_MEMBER = {".docx": "word/document.xml", ".pptx": "ppt/presentation.xml"}


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
