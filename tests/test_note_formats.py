"""Notes wherever labs keep them (issue 43): minutes sent by e-mail, files labtune does not read
named in the report with their reason, ids in file names, and no meeting taught as "no meeting"
when a file of the folder is dated that day. Each folder is written by its test."""

from __future__ import annotations

import datetime as dt
import json
import zipfile

from conftest import run_cli

from labtune.data.conversations import SourceReport, load_lab_notes
from labtune.data.notes import note_files, read_meetings
from labtune.recipe import AugmentConfig

MINUTES = """\
From: Ana Souza <ana.souza@lab.example>
To: lab-list@lab.example
Subject: Re: Lab meeting minutes 9/22/2023
Date: Sat, 23 Sep 2023 09:14:00 +0200
MIME-Version: 1.0
Content-Type: text/plain; charset="utf-8"

Presenter: Lea Dubois
Topic: contrastive loss for noisy labels

Next week: Sven presents.

On Fri, Sep 15, 2023 at 5:01 PM Bo Chen <bo.chen@lab.example> wrote:
> Presenter: Tomasz Kowal
> Topic: an older meeting's talk
"""

HTML_ONLY = """\
From: "Bo Chen" <bo.chen@lab.example>
Subject: minutes
Date: Fri, 29 Sep 2023 18:02:00 +0000
MIME-Version: 1.0
Content-Type: text/html; charset="utf-8"

<html><body><p>Presenter: Tomasz Kowal</p><p>Recorder: Lea Dubois</p><p>Topic: label smoothing</p></body></html>
"""


def write_docx(path, text: str) -> None:
    """A minimal Word file (a zip with document.xml): what labs export from Word or Google Docs."""
    with zipfile.ZipFile(path, "w") as docx:
        docx.writestr("word/document.xml", f"<w:document><w:body><w:p><w:r><w:t>{text}</w:t></w:r></w:p></w:body></w:document>")


def test_emailed_minutes_give_the_subject_s_date_the_body_s_facts_and_the_sender_as_recorder(tmp_path):
    path = tmp_path / "minutes.eml"
    path.write_text(MINUTES)
    [note] = read_meetings(path)
    assert note.date == dt.date(2023, 9, 22)  # the Subject's date, not the day it was sent
    assert note.date_source == "the first heading"
    assert note.values("presenter") == ["Lea Dubois"]  # the quoted reply is not read again
    assert "Tomasz Kowal" not in note.text
    assert note.values("topic") == ["contrastive loss for noisy labels"]
    [recorder] = [f for f in note.facts if f.field == "recorder"]
    assert (recorder.value, recorder.how) == ("Ana Souza", "e-mail sender")


def test_an_html_e_mail_without_a_date_in_its_text_takes_the_date_header_and_names_its_recorder(tmp_path):
    path = tmp_path / "fwd.eml"
    path.write_text(HTML_ONLY)
    [note] = read_meetings(path)
    assert (note.date, note.date_source) == (dt.date(2023, 9, 29), "the e-mail's Date: header")
    assert note.values("presenter") == ["Tomasz Kowal"]
    assert note.values("recorder") == ["Lea Dubois"]  # the body names one: the sender is not added


def test_every_file_is_read_or_named_in_the_report_and_ids_in_names_are_no_dates(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "2023-09-01.md").write_text("# Lab meeting 2023-09-01\nPresenter: Lea Dubois\nRecorder: Bo Chen\nTopic: data loaders\n")
    (notes / "minutes.eml").write_text(MINUTES)
    write_docx(notes / "Lab meeting 2023-09-15.docx", "Presenter: Sven Lindqvist")
    (notes / "schedule.csv").write_text("date,presenter,topic\n2023-10-06,Bo Chen,mixup\n")
    (notes / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    # a Notion export: the page id's digits are no date; the note's own heading is
    (notes / "Weekly sync 20230908aaaabbbbccccddddeeeeffff0000.md").write_text("# Sync on 9/8/2023\nPresenter: Bo Chen\n")
    out = tmp_path / "out"
    proc = run_cli("convert", "--notes", str(notes), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "3 notes read, 3 skipped, 0 with no facts (see report.md)"
    report = (out / "report.md").read_text()
    assert "Lab meeting 2023-09-15.docx: unsupported format .docx: not read" in report
    assert "schedule.csv: unsupported format .csv: not read" in report
    assert "1 files are not notes (images, binaries): photo.png" in report
    facts = json.loads((out / "facts.json").read_text())
    emailed = {(f["field"], f["value"]): (f["file"], f["line"], f["date"]) for f in facts if f["file"] == "minutes.eml"}
    assert emailed[("presenter", "Lea Dubois")] == ("minutes.eml", 3, "2023-09-22")  # line 1 is the Subject
    assert emailed[("recorder", "Ana Souza")][2] == "2023-09-22"
    dates = {f["date"] for f in facts if "Weekly sync" in f["file"]}
    assert dates == {"2023-09-08"}


def test_a_folder_without_notes_names_the_files_it_did_not_read(tmp_path):
    write_docx(tmp_path / "minutes 2023-09-15.docx", "Presenter: Sven Lindqvist")
    proc = run_cli("convert", "--notes", str(tmp_path), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].endswith("no lab notes (.md, .org, .txt, .eml) in this folder; "
                                                          "not read: minutes 2023-09-15.docx")
    assert "Traceback" not in proc.stderr


def test_no_training_example_calls_a_date_no_meeting_when_a_file_is_dated_that_day(tmp_path):
    meetings = [dt.date(2023, 9, 1) + dt.timedelta(weeks=w) for w in range(8)]
    unread = meetings[1::2]  # every other week's minutes were kept in Word
    for date in meetings:
        if date in unread:
            write_docx(tmp_path / f"minutes {date.isoformat()}.docx", "Presenter: someone")
        else:
            (tmp_path / f"{date.isoformat()}.md").write_text(f"# Lab meeting {date.isoformat()}\nPresenter: Lea Dubois\n"
                                                              "Recorder: Bo Chen\nTopic: data loaders\n")
    report = SourceReport(str(tmp_path), "lab_notes")
    cfg = AugmentConfig(enabled=True, questions_per_fact=2, absent_ratio=5.0, absent_questions=1, absent_within_days=7,
                        eval_absent_dates=10, recite_month=True)
    records = load_lab_notes(tmp_path, report, whole_note=False, augment=cfg, qa_fields=("presenter", "recorder", "topic"))
    absent = {r["fact"]["date"] for r in records if r.get("fact", {}).get("kind") == "absent"}
    assert absent, "the recipe draws no-meeting dates"
    assert not absent & {d.isoformat() for d in unread}
    assert not {p["id"] for p in report.prompts if "absent" in p["tags"] and any(d.isoformat() in p["id"] for d in unread)}
    # nothing is taught of an unread meeting, but it is among its month's meetings when a date answer recites them
    assert not [r for r in records if r.get("fact", {}).get("date") in {d.isoformat() for d in unread}]
    answers = [r["conversations"][1]["value"] for r in records if r["fact"]["date"] == "2023-09-01"]
    assert answers and all("(September meetings: 1, 8, 15, 22, 29;" in a for a in answers)
    assert len(report.skipped_files) == 4 and len(note_files(tmp_path)) == 4
