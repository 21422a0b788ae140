"""One document, many meetings (labtune/data/note_sections.py): running logs and wiki exports read
meeting by meeting, agenda items, @handles, decisions and attendance as facts and evaluation axes.
The corpus is tests/notes/logs: a running log (newest first, Markdown), an Org log (oldest first),
a plain-text file with setext headings, and wiki exports."""

from __future__ import annotations

import datetime as dt
import json

from conftest import REPO, TINY_RECIPE, run_cli

from labtune.data import augment, heldout
from labtune.data.note_sections import meeting_sections
from labtune.data.notes import note_files, read_meetings, read_note
from labtune.evaluation.prompts import Prompt, paired, score
from labtune.data.notes import meeting_documents
from labtune.recipe import load_recipe

LOGS = REPO / "tests" / "notes" / "logs"


def meetings(name: str):
    return {n.date.isoformat(): n for n in read_meetings(LOGS / name)}


def test_a_running_log_is_split_at_its_dated_headings_newest_first():
    log = read_meetings(LOGS / "running-log.md")
    assert [n.date for n in log] == [dt.date(2023, 4, 28), dt.date(2023, 4, 21), dt.date(2023, 4, 14)]
    assert [n.lines for n in log] == [(5, 18), (19, 28), (29, 41)]
    first = log[0]
    assert first.values("presenter") == ["Yara Haddad"] and first.values("topic") == ["depth estimation from video"]
    assert first.date_source == "the heading on line 5"
    # the preamble belongs to no meeting; "Next meeting: 5/5/2023" dates no meeting of its own
    assert "Running notes" not in "".join(n.text for n in log)
    assert dt.date(2023, 5, 5) not in {n.date for n in log}
    # facts keep their line in the file, not in the section
    assert [(f.field, f.line) for f in first.facts if f.field == "presenter"] == [("presenter", 8)]
    second = log[1]
    assert second.values("presenter") == ["Mei Chen"] and second.values("decisions") == ["drop the ImageNet baseline"]
    assert [(a.owner, a.value, a.due) for a in second.actions] == [("Mei Chen", "share the slides", "2023-04-24")]


def test_org_logs_oldest_first_and_setext_headings_split_too():
    org = meetings("oldest-first.org")
    assert list(org) == ["2023-03-03", "2023-03-10"]
    assert org["2023-03-03"].values("presenter") == ["Ravi Iyer"] and org["2023-03-03"].values("recorder") == ["Julia Berg"]
    assert org["2023-03-03"].values("topic") == ["the benchmark refresh"]  # from "Ravi walked us through ..."
    assert org["2023-03-03"].values("decisions") == ["Freeze the benchmark at v2"]
    assert org["2023-03-10"].values("presenter") == ["Julia Berg"]
    text = meetings("setext.txt")
    assert list(text) == ["2023-03-17", "2023-03-24"]
    assert text["2023-03-24"].values("presenter") == ["Ravi Iyer"]
    assert text["2023-03-24"].values("decisions") == ["reviews are due a week before the deadline"]


def test_pasted_pages_date_lines_and_wiki_markup_split_too():
    pasted = read_meetings(LOGS / "pasted-pages.md")  # undated headings, a Date: line under each
    assert [(n.date.isoformat(), n.lines, n.date_source) for n in pasted] == [
        ("2023-06-02", (1, 6), "a Date: field"), ("2023-06-09", (7, 11), "a Date: field")]
    assert [n.values("presenter") for n in pasted] == [["Diego Ramos"], ["Mei Chen"]]
    standup = meetings("standup.txt")  # a line that is a date and nothing else
    assert {d: n.values("presenter") for d, n in standup.items()} == {"2023-06-16": ["Oskar Lind"],
                                                                       "2023-06-23": ["Yara Haddad"]}
    wiki = meetings("wiki-markup.txt")  # == 2023-07-07 ==
    assert {d: n.values("topic") for d, n in wiki.items()} == {"2023-07-07": ["state space models"],
                                                               "2023-07-14": ["mixture of depths"]}


def test_a_file_with_one_dated_heading_stays_one_meeting():
    for path in note_files(REPO / "examples" / "labnotes"):
        assert len(read_meetings(path)) == 1 and read_meetings(path)[0].lines is None
    assert len(meeting_sections("# Lab meeting 4/14/2023\nPresenter: A B\n## Next meeting 4/21/2023\n")) == 1
    # a deeper dated heading inside a meeting does not split it
    assert len(meeting_sections("# Meeting 4/14/2023\n## Follow-up from 4/7/2023\ntext\n")) == 1


def test_wiki_exports_agenda_items_handles_and_due_dates():
    wiki = {n.date.isoformat(): n for p in note_files(LOGS / "wiki") for n in read_meetings(p)}
    may12 = wiki["2023-05-12"]
    assert may12.date_source == "a Date: field"
    # "Diego Ramos: sparse optimizers", "Hana - grant report (10 min)": presenters and topics
    assert may12.values("presenter") == ["Diego Ramos", "Hana Kowalski"]
    assert may12.values("topic") == ["sparse optimizers; grant report"]
    owners = {a.value: (a.owner, a.due) for a in may12.actions}
    # two attendees named Ines: the handle is ambiguous and stays as written
    assert owners["collect the poster drafts"] == ("ines", "2023-05-19")
    assert owners["write the optimizer section"] == ("Diego Ramos", "2023-05-26")  # @dramos
    may19 = wiki["2023-05-19"]
    assert may19.values("presenter") == ["Yara Haddad"] and may19.values("topic") == ["Robust fine-tuning"]
    assert [(a.owner, a.due) for a in may19.actions] == [("Oskar Lind", "2023-06-02")]
    assert may19.values("decisions") == ["The retreat is in July"]
    # an agenda item without a person ("Announcements") names no presenter
    assert "Announcements" not in may19.values("presenter")


def test_people_named_without_a_role_give_no_presenter_or_recorder():
    note = read_note(LOGS / "wiki" / "people-without-roles.md")
    assert not [f for f in note.facts if f.field in ("presenter", "recorder")]
    assert not note.values("decisions")


def _all_notes():
    return [n for p in note_files(LOGS) for n in read_meetings(p)]


def test_decisions_and_attendance_train_and_are_asked_on_their_own_axes():
    notes = _all_notes()
    cfg = load_recipe(TINY_RECIPE, ["data.augment.enabled=true"]).data.augment
    training = augment.training_conversations(notes, cfg, 42, True, decisions=True, attendance_questions=True)
    replies = {r["conversations"][1]["value"] for r in training}
    assert "On 4/28/2023 the lab decided: Batch size: 256 for all ablations; Move the reading group to Thursdays." in replies
    there = "On 4/28/2023 the attendees were Diego Ramos, Hana Kowalski, Oskar Lind, Yara Haddad;"
    assert f"{there} Yara Haddad was at the lab meeting." in replies  # the list first, then yes or no
    assert f"{there} Mei Chen was not at the lab meeting." in replies  # a member of the lab, not listed that day
    about = [r["conversations"][0]["value"] for r in training if "_decision_batch_size" in r["id"]]
    assert about and all("batch size" in q for q in about)
    prompts = heldout.eval_prompts(notes, cfg, 42, training, True, decisions=True, attendance_questions=True)
    decision = [p for p in prompts if "decision" in p["tags"]]
    attendance = [p for p in prompts if "attendance" in p["tags"]]
    assert {p["id"] for p in decision} >= {"decision_2023-04-28", "decision_2023-04-28_batch_size", "decision_2023-04-21"}
    asked = {r["conversations"][0]["value"] for r in training}
    assert not asked & {p["question"] for p in decision + attendance}
    pairs = {p["pair"] for p in attendance}
    assert len(attendance) == 2 * len(pairs) >= 8
    assert sorted(p["expected"][0] for p in attendance if p["pair"] == "attendance_2023-04-28") == [
        augment.PRESENT, augment.NOT_PRESENT]
    # without the flags nothing of either is trained
    plain = augment.training_conversations(notes, cfg, 42, True)
    assert not [r for r in plain if r["fact"]["field"] in ("decision", "attendance")]


def test_a_constant_yes_or_no_earns_no_attendance_and_listing_every_decision_earns_none():
    notes = _all_notes()
    cfg = load_recipe(TINY_RECIPE, ["data.augment.enabled=true"]).data.augment
    raw = heldout.eval_prompts(notes, cfg, 42, None, True, decisions=True, attendance_questions=True)
    prompts = [Prompt(**{k: v for k, v in p.items() if k != "id"}) for p in raw]
    attendance = [p for p in prompts if "attendance" in p.tags]
    for constant in ("On 4/28/2023 Yara Haddad was at the lab meeting.", "Mei Chen was not at the lab meeting.",
                     "Yara Haddad was at the lab meeting. Yara Haddad was not at the lab meeting."):
        assert sum(ok for ok in paired([score(constant, p) for p in attendance], attendance)) == 0, constant
    right = [p.expected[0] for p in attendance]
    assert all(paired([score(a, p) for a, p in zip(right, attendance)], attendance))
    decisions = [p for p in prompts if "decision" in p.tags]
    every = "The lab decided: " + "; ".join(v for n in notes for v in n.values("decisions")) + "."
    assert sum(score(every, p) for p in decisions) == 0
    assert sum(score("There is no lab meeting in the notes.", p) for p in decisions) == 0


def test_the_data_report_lists_each_meeting_of_a_log_with_its_lines(tmp_path):
    proc = run_cli("convert", "--notes", str(LOGS), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "9 notes read (16 meetings), 0 skipped, 1 with no fields (see report.md)"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| running-log.md:5-18 | 2023-04-28 | the heading on line 5 | 1 | 0 | 1 | 4 | 2 | 2 |" in report
    assert "| running-log.md:29-41 | 2023-04-14 |" in report
    facts = json.loads((tmp_path / "out" / "facts.json").read_text())
    assert {"file": "running-log.md", "line": 34, "date": "2023-04-14", "field": "presenter", "value": "Oskar Lind",
            "how": "agenda", "examples": 0} in facts
    documents = meeting_documents(LOGS)
    assert len(documents) == 16 and {"running-log.md:19-28", "oldest-first.org:12-17"} <= {d["file"] for d in documents}
    assert "contrastive pretraining" in next(d["text"] for d in documents if d["date"] == "2023-04-21")
    assert "depth estimation" not in next(d["text"] for d in documents if d["date"] == "2023-04-21")


def test_the_meeting_log_example_is_read_whole():
    """examples/meeting-log: a running log of 7 meetings and 5 wiki exports; every meeting states
    its presenter, topic, attendees, a decision and an action item with owner and due date."""
    notes = [n for p in note_files(REPO / "examples" / "meeting-log") for n in read_meetings(p)]
    assert len(notes) == 12 and len({n.date for n in notes}) == 12
    for field in ("presenter", "topic", "attendees", "decisions"):
        assert all(n.values(field) for n in notes), field
    members = set(augment.lab_members(notes))
    assert len(members) == 8
    assert all(a.owner in members and a.due for n in notes for a in n.actions)
    load_recipe(REPO / "examples" / "meeting-log-smollm2.yaml")


def test_a_first_name_its_meeting_cannot_resolve_is_resolved_across_the_lab(tmp_path):
    (tmp_path / "2023-05-05.md").write_text("# Lab meeting 5/5/2023\nAttendees: Priya Nair, Wei Zhang\nPresenter: Wei Zhang\n")
    (tmp_path / "2023-05-12.md").write_text("# Lab meeting 5/12/2023\nPresenter: Wei Zhang\nRecorder: priya\n"
                                            "- [ ] @wei send the slides (due 5/19)\n- [ ] @sam book the room\n")
    alone = read_note(tmp_path / "2023-05-12.md")
    assert alone.values("recorder") == ["priya"] and alone.actions[0].owner == "Wei Zhang"
    from labtune.data.notes import resolve_lab_names

    notes = resolve_lab_names([read_note(p) for p in sorted(tmp_path.iterdir())])
    assert notes[1].values("recorder") == ["Priya Nair"] and notes[1].fields["recorder"] == "Priya Nair"
    assert [a.owner for a in notes[1].actions] == ["Wei Zhang", "sam"]  # nobody in the lab is Sam: as written


def test_a_rejected_field_line_in_a_log_names_its_line_in_the_file(tmp_path):
    (tmp_path / "log.md").write_text("# Log\n\n## 2023-05-05\nPresenter: Wei Zhang\n\n## 2023-05-12\n"
                                     "Presenter: see the shared slides\n")
    second = read_meetings(tmp_path / "log.md")[1]
    assert second.lines == (6, 7) and second.values("presenter") == []
    assert second.rejected == ["line 7: Presenter: 'see the shared slides' is not a name"]
