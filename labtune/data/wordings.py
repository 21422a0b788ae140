"""The wordings facts are asked in: question templates per field and axis, and the date forms
people write, each split into the ones training uses and the ones held out for evaluation (a
held-out wording or date form never trains)."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

from labtune.data.notes import MONTHS


def _ordinal(day: int) -> str:
    return f"{day}{'th' if 11 <= day % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th')}"


def _month(date: dt.date) -> str:
    return MONTHS[date.month - 1].capitalize()


# date forms people write; `{}` is filled with the date's rendering
TRAIN_DATE_FORMS = {
    "us": lambda d: f"{d.month}/{d.day}/{d.year}",
    "us_padded": lambda d: f"{d.month:02d}/{d.day:02d}/{d.year}",
    "iso": lambda d: d.isoformat(),
    "long": lambda d: f"{_month(d)} {d.day}, {d.year}",
    "day_month": lambda d: f"{d.day} {_month(d)} {d.year}",
    "ordinal": lambda d: f"{_month(d)} {_ordinal(d.day)} {d.year}",
    "short_month": lambda d: f"{_month(d)[:3]} {d.day}, {d.year}",
    "short_year": lambda d: f"{d.month}/{d.day}/{d.year % 100:02d}",
    "dotted": lambda d: f"{d.day}.{d.month}.{d.year}",
    "weekday_short": lambda d: f"{d.strftime('%a')} {d.month}/{d.day}/{d.year}",
    "ymd_dotted": lambda d: f"{d.year}.{d.month:02d}.{d.day:02d}",
    "ordinal_day": lambda d: f"{_ordinal(d.day)} {_month(d)} {d.year}",
}
# "the May 12 meeting": without the year, only where no two meetings share a month and day
YEARLESS_FORM = lambda d: f"{_month(d)} {d.day}"  # noqa: E731
HELDOUT_DATE_FORMS = {
    "weekday": lambda d: f"{d.strftime('%A')}, {_month(d)} {d.day}, {d.year}",
    "slashes_iso": lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
    "of_month": lambda d: f"{_ordinal(d.day)} of {_month(d)} {d.year}",
}

# question templates per field; {d} is a date form. Presenter and recorder templates are written
# in pairs (the same sentence with the other role's words, at the same place in both lists), and
# a meeting's presenter and recorder are asked in the same pairs and date forms: the question then
# tells the two names apart by its role words alone, not by a wording one of them happened to get
# (docs/evaluation.md, "Minimal pairs").
TRAIN_TEMPLATES = {
    "presenter": ["Who presented at the lab meeting on {d}?", "Who is the presenter on {d} lab meeting?",
                  "Who is the Presenter on {d} lab meeting?", "Who was the presenter at the {d} lab meeting?",
                  "Who presented on {d}?", "Who gave the presentation at the lab meeting on {d}?",
                  "Lab meeting {d}: who presented?", "Name the presenter of the {d} lab meeting.",
                  "who presented at the {d} meeting?", "Who was presenting at the lab meeting of {d}?",
                  "Who was the speaker at the lab meeting on {d}?", "Who gave the talk on {d}?",
                  "Who led the lab meeting on {d}?", "Who was the Presenter on {d}?",
                  "Who spoke at the group meeting on {d}?", "Tell me who presented at the {d} group meeting."],
    "recorder": ["Who took notes at the lab meeting on {d}?", "Who is the recorder on {d} lab meeting?",
                 "Who is the Recorder on {d} lab meeting?", "Who was the recorder at the {d} lab meeting?",
                 "Who took the minutes on {d}?", "Who wrote the notes for the lab meeting on {d}?",
                 "Lab meeting {d}: who took the notes?", "Name the recorder of the {d} lab meeting.",
                 "who took notes at the {d} meeting?", "Who was writing the notes at the lab meeting of {d}?",
                 "Who was the scribe at the lab meeting on {d}?", "Who kept the minutes on {d}?",
                 "Who recorded the notes of the {d} lab meeting?", "Who was the Recorder on {d}?",
                 "Who was the note-taker at the group meeting on {d}?", "Tell me who took the minutes at the {d} group meeting."],
    "topic": ["What was the topic of the lab meeting on {d}?", "What was discussed at the {d} lab meeting?",
              "What was the Topic on {d}?", "What was the lab meeting on {d} about?",
              "Lab meeting {d}: what was the topic?", "What topic was presented on {d}?",
              "what was the {d} lab meeting about?", "Topic of the lab meeting on {d}?",
              "What subject was covered at the lab meeting on {d}?", "What was the {d} group meeting about?",
              "What did the lab discuss on {d}?", "What was the theme of the {d} meeting?"],
}
HELDOUT_TEMPLATES = {
    "presenter": ["Which lab member gave the talk at the meeting held on {d}?",
                  "Can you tell me who led the {d} group meeting?",
                  "I missed the meeting on {d}. Who was the speaker?"],
    "recorder": ["Which person kept the minutes at the meeting held on {d}?",
                 "Can you tell me who was taking minutes at the {d} group meeting?"],
    "topic": ["What subject did the group meeting on {d} cover?",
              "I missed the meeting on {d}. What was it about?"],
}
TRAIN_REVERSE = ["When did {who} present?", "On which dates did {who} present at lab meeting?",
                 "When was {who} the presenter?"]
HELDOUT_REVERSE = ["Which meeting dates had {who} as the speaker?"]
TRAIN_SUMMARY = ["What happened at the lab meeting on {d}?", "Summarize the {d} lab meeting."]
# action items: {task} is the task as the note words it ("draft the KDD related-work section")
TRAIN_ACTION = ["Who is to {task}, from the {d} lab meeting?", "At the {d} lab meeting, who agreed to {task}?",
                "Who was asked to {task} at the lab meeting on {d}?", "Action item from {d}: who has to {task}?",
                "Who took the action item to {task} on {d}?", "Who will {task}, as decided at the {d} meeting?"]
HELDOUT_ACTION = ["Which lab member is responsible for the task to {task} from the {d} meeting?",
                  "Can you tell me who has to {task}, per the {d} group meeting?"]
TRAIN_DEADLINE = ["When is the action item to {task} (from the {d} meeting) due?",
                  "What is the deadline to {task}, from the {d} lab meeting?",
                  "By when must someone {task}? (lab meeting of {d})", "Due date of the task to {task} ({d} meeting)?"]
HELDOUT_DEADLINE = ["By what date should the task to {task} from the {d} group meeting be done?",
                    "I missed the {d} meeting. When is the deadline to {task}?"]
# decisions: {d} a date form, {subject} what a "Subject: outcome" decision is about ("batch size")
TRAIN_DECISION = ["What did the lab decide at the {d} meeting?", "What was decided at the lab meeting on {d}?",
                  "Which decisions were made on {d}?", "What was agreed at the {d} lab meeting?",
                  "Lab meeting {d}: what was decided?", "What did the group agree on at the {d} meeting?",
                  "What decision was taken at the lab meeting on {d}?", "What did we decide on {d}?",
                  "What was the conclusion of the {d} lab meeting?", "What came out of the lab meeting on {d}?",
                  "What was resolved at the {d} meeting?"]
HELDOUT_DECISION = ["What was the outcome of the discussion at the meeting held on {d}?",
                    "Can you tell me what the group settled on at the {d} meeting?"]
TRAIN_DECISION_ABOUT = ["What was agreed about {subject} on {d}?", "What did the lab decide about {subject} at the {d} meeting?",
                        "At the lab meeting on {d}, what was decided on {subject}?"]
HELDOUT_DECISION_ABOUT = ["Regarding {subject}, what was settled at the group meeting held on {d}?"]
# attendance: {who} a lab member, {d} a date form; answered yes or no
TRAIN_ATTENDANCE = ["Was {who} at the lab meeting on {d}?", "Did {who} attend the {d} lab meeting?",
                    "Was {who} present at the {d} meeting?", "Lab meeting {d}: was {who} there?",
                    "Did {who} come to the lab meeting on {d}?", "Was {who} among the attendees on {d}?"]
HELDOUT_ATTENDANCE = ["Can you tell me whether {who} joined the group meeting held on {d}?",
                      "Is it true that {who} was at the {d} group meeting?"]


def asked_wordings(dates: list[dt.date], forms: list[Any], per_fact: int, rng: random.Random
                   ) -> dict[dt.date, list[tuple[int, Any]]]:
    """(template index, date form) of each meeting's questions, the same for every field of that
    meeting (presenter and recorder questions are then minimal pairs). Template indexes take turns
    across meetings in a shuffled order, so that every wording is used about equally often and
    none belongs to one meeting (a field with fewer templates wraps around: four of the topic's 12
    come twice as often); a meeting's date forms are distinct while there are enough."""
    shapes = len(TRAIN_TEMPLATES["presenter"])
    order = rng.sample(range(shapes), shapes)
    asked = {}
    for n, date in enumerate(dates):
        chosen_forms = rng.sample(forms, len(forms))
        asked[date] = [(order[(n * per_fact + i) % shapes], chosen_forms[i % len(forms)]) for i in range(per_fact)]
    return asked
# two things about one meeting in one question: who presented and what it was about
TRAIN_TWO_PART = ["Who presented at the lab meeting on {d} and what was the talk about?",
                  "Who was the presenter on {d}, and what was the topic?",
                  "At the {d} lab meeting, who presented and on what?",
                  "What was presented at the {d} lab meeting, and by whom?"]
HELDOUT_TWO_PART = ["Who gave the talk at the group meeting held on {d}, and what was it about?",
                    "Can you tell me who spoke at the {d} meeting and what the subject was?"]
# a statement of a note (labtune.data.statements), asked about one of its subjects `{s}`; `{who}`: a person it names
TRAIN_STATEMENT = ["What did the notes of the {d} lab meeting say about {s}?",
                   "What was said about {s} at the lab meeting on {d}?",
                   "At the {d} lab meeting, what came up about {s}?",
                   "What do the {d} lab meeting notes record about {s}?",
                   "Tell me what was noted about {s} at the {d} meeting.",
                   "What about {s}, from the lab meeting on {d}?"]
TRAIN_STATEMENT_BY = ["What did {who} say about {s} at the {d} lab meeting?",
                      "What about {s} and {who}, at the lab meeting on {d}?"]
TRAIN_STATEMENT_KIND = {
    "result": ["What result on {s} was reported at the {d} lab meeting?",
               "How many or how much, about {s}, per the {d} lab meeting?",
               "What numbers were given for {s} at the lab meeting on {d}?"],
    "plan": ["What was planned about {s} at the {d} lab meeting?",
             "What is to happen with {s}, per the lab meeting on {d}?",
             "What was the next step for {s} after the {d} meeting?"],
}
HELDOUT_STATEMENT = ["According to the notes from the group meeting held on {d}, what about {s}?",
                     "What do we know about {s} from the meeting of {d}?"]
HELDOUT_STATEMENT_KIND = {
    "result": ["What was found regarding {s}, as recorded for the {d} group meeting?"],
    "plan": ["What was the plan regarding {s} coming out of the {d} group meeting?"],
}
