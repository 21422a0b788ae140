"""Every statement of a note as a fact: the sentences and bullets no field takes (results,
numbers, plans, feedback, who asked what, what was ordered).

A statement is taught as it stands: questions about its subject in many wordings, and an answer
that repeats the sentence word for word after the meeting's date, so its numbers and names come
out exactly and nothing is invented. Its kind is `result` (a number, or a finding verb), `plan`
("next week", "will", "to do", an action item) or `said`; the evaluation's tags follow it.

A statement's subjects are its key phrases, found by a documented set of patterns in the manner of
RAKE (Rose et al. 2010): the sentence is cut at function words, reporting verbs, numbers, people
and punctuation, and the longest remaining runs of content words (three words at most) are its
subjects, longest first. No keyphrase library is used: KeyBERT and spaCy need a model downloaded
at run time, rake-nltk needs NLTK's stopword corpus downloaded, and YAKE's statistics need more
text than one sentence to rank by; the patterns are short and every choice is visible here.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from labtune.data.note_fields import NoteFact
from labtune.data.note_prose import _sentences

RESULT, PLAN, SAID = "result", "plan", "said"
MIN_WORDS = 4  # a shorter line is a heading or a label, not a statement
MAX_SUBJECTS = 3
# what a result says it found, and what a plan says is to come
_RESULT_VERBS = re.compile(r"\b(?:show(?:s|ed|n)?|found|find(?:s|ing)?|observ\w+|measur\w+|reach(?:ed|es)?|achiev\w+|"
                           r"improv\w+|increas\w+|decreas\w+|dropp?\w*|reduc\w+|gave|gives|got|scor\w+|report\w*|"
                           r"detect\w+|confirm\w+|cut|runs?|took|takes)\b", re.IGNORECASE)
_PLAN_WORDS = re.compile(r"\b(?:next\s+(?:week|time|month|step|steps|meeting)|will|plans?|planned|planning|going\s+to|"
                         r"to\s+do|todo|follow[- ]up|should|needs?\s+to|has\s+to|have\s+to|is\s+to|are\s+to|"
                         r"tomorrow|upcoming|intends?|aim\s+to|by\s+(?:next|the\s+end))\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w/.,])\d+(?:,\d{3})*(?:\.\d+)?%?(?![\w/]|[.,]\d)")
# words that are never part of a subject: function words, reporting verbs, vague nouns
STOPWORDS = frozenset("""
a an the and or but nor so yet of to in on at by for from with without into onto over under about above below
between among through during against toward towards within across along despite upon before after since until than then as per via vs is are was were be been being am
has have had do does did done can could may might must shall should will would this that these those there here
it its it's they them their we us our you your he him his she her i me my mine who whom whose which what when
where why how all any both each every few more most other some such no not only own same too very just also
again further once up down out off new old next last first second one two three four five six seven eight nine
ten about around approximately roughly nearly almost instead still already now today week weeks month year
show shows showed shown said says say asked ask asks suggested suggest suggests proposed propose noted note notes
presented present presents reported report reports used use uses using found find finds mentioned mention agreed
agree will wants want wanted need needs needed got asking ask walked went going send sent
set write wrote rerun rerunning check checks start started try tried keep kept add added update get gets made make makes gave give gives took take takes
discussed discuss discusses explained explain thinks think thought looked look looks seems seem seemed
monday tuesday wednesday thursday friday saturday sunday
lab meeting meetings group team everyone someone people thing things lot bit whether if because while though
although however please let let's like well really maybe perhaps yes okay ok
""".split())


@dataclass
class Statement:
    """One statement of a meeting: its words, its line, its kind and subjects, and the people it names."""

    date: dt.date
    text: str
    line: int
    kind: str
    subjects: list[str]
    people: list[str]


def statement_kind(text: str) -> str:
    if _PLAN_WORDS.search(text):
        return PLAN
    if _NUMBER.search(text) or _RESULT_VERBS.search(text):
        return RESULT
    return SAID


def numbers(text: str) -> list[str]:
    """The numbers a statement gives ("12,000", "0.25", "70%"), dates left out."""
    return [m.group(0) for m in _NUMBER.finditer(text)]


def subjects(text: str, names: list[str] | tuple[str, ...] = (), task: bool = False) -> list[str]:
    """The statement's key phrases, longest first (up to MAX_SUBJECTS): runs of content words
    between function words, verbs, numbers, people's names and punctuation. A one-word phrase in
    -ed is a verb ("designed", "replaced"), and so is an action item's (`task`) first word."""
    people = {part.lower() for name in names for part in name.split()}
    runs: list[list[str]] = [[]]
    for number, token in enumerate(re.findall(r"[A-Za-z][\w'’-]*|\d[\d,.]*%?|[^\w\s]", text)):
        word = token.lower()
        content = (token[0].isalpha() and word not in STOPWORDS and word not in people and not (task and number == 0)
                   and (len(word) >= 3 or any(c.isdigit() for c in word)))
        if content:
            runs[-1].append(token)
        elif runs[-1]:
            runs.append([])
    phrases: list[str] = []
    for run in runs:
        for start in range(0, len(run), 3):  # a long run is cut into phrases of three
            phrase = " ".join(run[start:start + 3])
            if phrase and phrase.lower() not in (p.lower() for p in phrases):
                phrases.append(phrase)
    phrases = [p for p in phrases if " " in p or not p.lower().endswith("ed")]
    ranked = sorted(phrases, key=lambda p: (-len(p.split()), phrases.index(p)))
    return ranked[:MAX_SUBJECTS]


def named(text: str, names: list[str]) -> list[str]:
    """The people of `names` a statement names, by full or first name, in the order it names them."""
    found = [(m.start(), name) for name in names for part in {name, name.split()[0]}
             if (m := re.search(rf"(?<!\w){re.escape(part)}(?!\w)", text))]
    return list(dict.fromkeys(name for _, name in sorted(found)))


def _is_title(text: str, line: int) -> bool:
    """The meeting's heading ("Lab meeting on 2/10/2023", "Lab meeting <2023-01-27 Fri>")."""
    from labtune.data.note_dates import find_dates

    return line <= 2 and len(text.split()) <= 8 and bool(find_dates(text))


def statement_facts(text: str, facts: list[NoteFact], date: dt.date) -> list[NoteFact]:
    """A `statement` fact (how "prose", kind result/plan/said) for every sentence or list item of
    the prose that no fact was read from: not a field line, not the line of a presenter, recorder,
    topic, attendee, action item or decision, not the meeting's heading."""
    taken = {f.line for f in facts}
    found = []
    for line, sentence in _sentences(text):
        sentence = sentence.strip().rstrip(":")
        if line in taken or len(sentence.split()) < MIN_WORDS or _is_title(sentence, line):
            continue
        found.append(NoteFact("statement", sentence, line, "prose", kind=statement_kind(sentence)))
    return found
