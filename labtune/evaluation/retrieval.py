"""The notes-retrieval baseline: the most relevant notes put in the prompt, BM25 by bm25s.

Retrieval of the source text beats plain fine-tuning for new knowledge unless fine-tuning sees many
variations of each fact (Ovadia et al. 2024), so a lab sees both on its own notes. Each note is
indexed with its text and its date written in every form people use, so "April 14th 2023" finds
the note headed "4/14/2023". bm25s (sparse-matrix BM25, numpy only) is a well-kept library for
exactly this.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from labtune.data.raft import notes_context
from labtune.data.wordings import HELDOUT_DATE_FORMS, TRAIN_DATE_FORMS


class NotesIndex:
    """BM25 over the notes, and the date first: a question that names a meeting's date, in any form
    (labtune.data.note_dates), gets that meeting's note at the top, whatever its words; BM25 ranks
    the rest (alone it ranks by words, and a date is a few tokens among many)."""

    def __init__(self, documents: list[dict[str, Any]], date_order: str = "MDY"):
        import bm25s

        self.documents = documents
        self.date_order = date_order
        self._bm25s = bm25s
        self.retriever = bm25s.BM25()
        corpus = [self._indexed(d) for d in documents]
        self.retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)

    @staticmethod
    def _indexed(document: dict[str, Any]) -> str:
        date = dt.date.fromisoformat(document["date"])
        forms = [form(date) for form in (*TRAIN_DATE_FORMS.values(), *HELDOUT_DATE_FORMS.values())]
        return document["text"] + "\n" + " ".join(forms)

    def search(self, question: str, k: int) -> list[dict[str, Any]]:
        from labtune.data.note_dates import find_dates

        if not self.documents:
            return []
        named = {found.date.isoformat() for found in find_dates(question, self.date_order)}
        dated = [d for d in self.documents if d["date"] in named]
        tokens = self._bm25s.tokenize([question], stopwords="en", show_progress=False)
        found, scores = self.retriever.retrieve(tokens, k=min(k + len(dated), len(self.documents)), show_progress=False)
        ranked = [self.documents[int(i)] for i, score in zip(found[0], scores[0]) if score > 0]
        return (dated + [d for d in ranked if all(d is not o for o in dated)])[:k]

    def context(self, question: str, k: int, max_chars: int = 6000) -> str:
        """The system turn for the question: the k most relevant notes (cut to max_chars in all) under
        a header saying whether the first is dated the day the question names (labtune.data.raft,
        the words training's RAFT questions carry)."""
        from labtune.data.note_dates import find_dates

        notes, used, found = [], 0, self.search(question, k)
        for document in found:
            text = document["text"][: max(0, max_chars - used)]
            if not text:
                break
            notes.append(text)
            used += len(text)
        named = find_dates(question, self.date_order)
        asked = named[0].date if named else None
        return notes_context(notes, asked, bool(found) and asked is not None and found[0]["date"] == asked.isoformat(),
                             (dt.date.fromisoformat(d["date"]) for d in self.documents), [question])


def retrieval_recall(index: NotesIndex, prompts: list[Any], k: int, date_order: str = "MDY") -> dict[str, Any]:
    """How often the note of the meeting a question asks about reached its prompt (recall@k),
    apart from whether it was then read right: over the questions that name a date with a note,
    overall and per tag. A date is read from the question in any form (labtune.data.note_dates)."""
    from labtune.data.note_dates import find_dates

    noted = {d["date"] for d in index.documents}
    found = asked = 0
    by_tag: dict[str, list[int]] = {}
    for prompt in prompts:
        dates = [d.date.isoformat() for d in find_dates(prompt.question, date_order)]
        if not dates or dates[0] not in noted:
            continue
        hit = dates[0] in {d["date"] for d in index.search(prompt.question, k)}
        found, asked = found + hit, asked + 1
        for tag in prompt.tags:
            tally = by_tag.setdefault(tag, [0, 0])
            tally[0], tally[1] = tally[0] + hit, tally[1] + 1
    return {"k": k, "asked": asked, "found": found, "recall": round(found / asked, 4) if asked else None,
            "by_tag": {tag: {"found": f, "asked": a} for tag, (f, a) in sorted(by_tag.items())}}


def recall_line(retrieval: dict[str, Any]) -> str:
    """"the asked meeting's note reached the prompt for 80 of 81 questions (recall@1 99%)"."""
    share = f"{retrieval['recall']:.0%}" if retrieval["recall"] is not None else "-"
    return (f"the asked meeting's note reached the prompt for {retrieval['found']} of {retrieval['asked']} questions "
            f"that name a meeting (recall@{retrieval['k']} {share})")
