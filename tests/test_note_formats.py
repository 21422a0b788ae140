"""Notes wherever labs keep them (issue 43): minutes sent by e-mail, Word documents, files labtune
does not read named in the report with their reason, ids in file names, and no meeting taught as "no meeting"
when a file of the folder is dated that day. Each folder is written by its test."""

from __future__ import annotations

import datetime as dt
import json
import zipfile
from pathlib import Path

from conftest import run_cli
from lab_folder import meetings, write_docx, write_lab_folder, write_pdf

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
    write_docx(notes / "minutes.docx", ["Lab meeting minutes, 15 September 2023", "We discussed the MICCAI abstract."],
               [["Presenter", "Sven Lindqvist"], ["Recorder", "Lea Dubois"], ["Topic", "label noise in CT segmentation"]])
    (notes / "2023-09-29.docx").write_bytes(b"PK\x03\x04 damaged")
    (notes / "Lab meeting 2023-10-13.key").write_bytes(b"PK\x03\x04")
    (notes / "schedule.csv").write_text("date,presenter,topic\n2023-10-06,Bo Chen,mixup\n")
    (notes / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    # a Notion export: the page id's digits are no date; the note's own heading is
    (notes / "Weekly sync 20230908aaaabbbbccccddddeeeeffff0000.md").write_text("# Sync on 9/8/2023\nPresenter: Bo Chen\n")
    out = tmp_path / "out"
    proc = run_cli("convert", "--notes", str(notes), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "5 notes read, 3 skipped, 0 with no fields (see report.md)"
    report = (out / "report.md").read_text()
    assert "2023-09-29.docx: not a readable .docx file (damaged, or another format under that name)" in report
    assert "Lab meeting 2023-10-13.key: unsupported format .key: not read" in report
    assert "1 files are not notes (images, binaries): photo.png" in report
    facts = json.loads((out / "facts.json").read_text())
    emailed = {(f["field"], f["value"]): (f["file"], f["line"], f["date"]) for f in facts if f["file"] == "minutes.eml"}
    assert emailed[("presenter", "Lea Dubois")] == ("minutes.eml", 3, "2023-09-22")  # line 1 is the Subject
    assert emailed[("recorder", "Ana Souza")][2] == "2023-09-22"
    worded = {(f["field"], f["value"]): (f["file"], f["line"], f["date"], f["how"]) for f in facts if f["file"] == "minutes.docx"}
    assert worded[("presenter", "Sven Lindqvist")] == ("minutes.docx", 7, "2023-09-15", "table")  # a line of its Markdown
    assert worded[("topic", "label noise in CT segmentation")][2] == "2023-09-15"
    assert {(f["date"], f["field"], f["value"]) for f in facts if f["file"] == "schedule.csv"} == {
        ("2023-10-06", "presenter", "Bo Chen"), ("2023-10-06", "topic", "mixup")}  # a row without a note: a meeting
    dates = {f["date"] for f in facts if "Weekly sync" in f["file"]}
    assert dates == {"2023-09-08"}


def test_a_folder_without_notes_names_the_files_it_did_not_read(tmp_path):
    (tmp_path / "minutes 2023-09-15.pages").write_bytes(b"PK\x03\x04")
    proc = run_cli("convert", "--notes", str(tmp_path), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].endswith("no lab notes (.md, .org, .txt, .eml) in this folder; "
                                                          "not read: minutes 2023-09-15.pages")
    assert "Traceback" not in proc.stderr


def test_no_training_example_calls_a_date_no_meeting_when_a_file_is_dated_that_day(tmp_path):
    meetings = [dt.date(2023, 9, 1) + dt.timedelta(weeks=w) for w in range(8)]
    unread = meetings[1::2]  # every other week's minutes were kept in a format labtune does not read, or damaged
    for i, date in enumerate(meetings):
        if date in unread:
            (tmp_path / f"minutes {date.isoformat()}.{'pages' if i % 4 == 1 else 'docx'}").write_bytes(b"PK\x03\x04")
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
    assert len(report.skipped_files) == 4 and len(note_files(tmp_path)) == 6  # the damaged .docx files are tried


def test_a_lab_folder_kept_five_ways_gives_every_meeting_and_every_field(tmp_path):
    held = write_lab_folder(tmp_path / "notes")
    (tmp_path / "notes" / "Lab meeting 2024-01-19.pages").write_bytes(b"PK\x03\x04")  # a meeting labtune cannot read
    report = SourceReport("notes", "lab_notes")
    cfg = AugmentConfig(enabled=True, questions_per_fact=2, absent_ratio=5.0, absent_questions=1, absent_within_days=7,
                        eval_absent_dates=10, recite_month=True)
    records = load_lab_notes(tmp_path / "notes", report, whole_note=False, augment=cfg,
                             qa_fields=("presenter", "recorder", "topic", "action_items"))
    facts: dict[str, list[dict]] = {}
    for fact in report.read_facts:
        facts.setdefault(fact["date"], []).append(fact)
    found = {"date": 0, "presenter": 0, "recorder": 0, "topic": 0, "owner": 0}
    for m in held:
        mine = facts.get(m["date"].isoformat(), [])
        values = {f["field"]: [g["value"] for g in mine if g["field"] == f["field"]] for f in mine}
        found["date"] += bool(mine)
        found["presenter"] += values.get("presenter") == [m["presenter"]]
        found["recorder"] += values.get("recorder") == [m["recorder"]]
        found["topic"] += [t.lower() for t in values.get("topic", [])] == [m["topic"].lower()]
        found["owner"] += any(f["field"] == "action_items" and f.get("owner") == m["owner"] and f.get("due") == m["due"].isoformat()
                              for f in mine)
    assert found == {"date": 20, "presenter": 20, "recorder": 20, "topic": 20, "owner": 20}
    assert any("Lab meeting 2024-01-19.pages: unsupported format .pages" in s for s in report.skipped_files)
    named = {m["date"].isoformat() for m in held} | {"2024-01-19"}
    absent = {r["fact"]["date"] for r in records if r["fact"]["kind"] == "absent"}
    assert absent and not absent & named


def test_a_schedule_row_joins_its_note_and_a_conflict_is_named(tmp_path):
    (tmp_path / "2023-12-22.txt").write_text("12/22/2023\nPresenter: Lea Dubois\nRecorder: Ana Souza\n")
    (tmp_path / "talks.tsv").write_text("Meeting date\tSpeaker\tTitle\n2023-12-22\tBo Chen\tdata loader profiling\n"
                                        "2024-01-05\tSven Lindqvist\ttest-time adaptation\nTBD\tAna Souza\tretreat\n")
    report = SourceReport(str(tmp_path), "lab_notes")
    load_lab_notes(tmp_path, report, augment=AugmentConfig())
    [note, row] = report.notes
    assert (note["file"], note["facts"]) == ("2023-12-22.txt", {"presenter": 1, "recorder": 1, "topic": 1})
    assert "presenter: talks.tsv line 2 says Bo Chen; the note says Lea Dubois (the note's kept)" in note["flags"]
    assert (row["file"], row["date"], row["read_from"]) == ("talks.tsv:3-3", "2024-01-05", "the date column (line 3)")
    assert "talks.tsv line 4: no date in the date column" in note["flags"]  # the row that says so merged into the note
    topic = [f for f in report.read_facts if f["field"] == "topic" and f["date"] == "2023-12-22"]
    assert topic == [{"file": "talks.tsv", "line": 2, "date": "2023-12-22", "field": "topic", "value": "data loader profiling",
                      "how": "schedule row"}]


def test_an_xlsx_schedule_and_a_sheet_that_is_no_schedule(tmp_path):
    import openpyxl

    book = openpyxl.Workbook()
    book.active.append(["Lab talks 2023"])
    book.active.append(["Date", "Presenter", "Topic"])
    book.active.append([dt.datetime(2023, 9, 1), "Lea Dubois", "contrastive loss"])
    book.save(tmp_path / "talks.xlsx")
    [meeting] = read_meetings(tmp_path / "talks.xlsx")
    assert (meeting.date, meeting.values("presenter"), meeting.facts[0].line) == (dt.date(2023, 9, 1), ["Lea Dubois"], 3)
    (tmp_path / "budget.csv").write_text("item,cost\nGPU,3000\n")
    report = SourceReport(str(tmp_path), "lab_notes")
    load_lab_notes(tmp_path, report, augment=AugmentConfig())
    assert report.skipped_files == ["budget.csv: not a schedule: no header row with a date column and a presenter, topic "
                                    "or other field's column (columns: item, cost)"]


def test_a_title_heading_after_the_speaker_lines_is_the_topic_and_html_and_pdf_are_read_or_named(tmp_path):
    (tmp_path / "2023-03-03.md").write_text("**Speaker:** Lea Dubois\n**Minutes:** Bo Chen\n\n"
                                            "## Contrastive loss for noisy labels\n\nWe went through the ablations.\n\n## Notes\n")
    [note] = read_meetings(tmp_path / "2023-03-03.md")
    assert [(f.value, f.how) for f in note.facts if f.field == "topic"] == [("Contrastive loss for noisy labels", "title heading")]
    (tmp_path / "minutes.html").write_text("<html><body><h1>Lab meeting 9/8/2023</h1><table><tr><td>Presenter</td>"
                                           "<td>Bo Chen</td></tr><tr><td>Topic</td><td>label smoothing</td></tr></table>"
                                           "</body></html>")
    [page] = read_meetings(tmp_path / "minutes.html")
    assert (page.date, page.values("presenter"), page.values("topic")) == (dt.date(2023, 9, 8), ["Bo Chen"], ["label smoothing"])
    (tmp_path / "scan 2023-09-15.pdf").write_bytes(b"\x89PNG not a pdf")
    report = SourceReport(str(tmp_path), "lab_notes")
    load_lab_notes(tmp_path, report, augment=AugmentConfig())
    assert report.skipped_files == ["scan 2023-09-15.pdf: not a readable .pdf file (damaged, or another format under that name)"]


def test_an_odt_document_reads_its_headings_paragraphs_and_table(tmp_path):
    ns = ('xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" '
          'xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" '
          'xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0"')
    cell = lambda text: f"<table:table-cell><text:p>{text}</text:p></table:table-cell>"  # noqa: E731
    content = (f'<?xml version="1.0" encoding="UTF-8"?><office:document-content {ns}><office:body><office:text>'
               '<text:h text:outline-level="1">Lab meeting 2023-10-20</text:h><text:p>We met in room 4.</text:p>'
               f'<table:table><table:table-row>{cell("Presenter")}{cell("Ana Souza")}</table:table-row>'
               f'<table:table-row>{cell("Topic")}{cell("test-time adaptation")}</table:table-row></table:table>'
               '<text:list><text:list-item><text:p>TODO Bo Chen: share the slides by 10/27/2023</text:p></text:list-item>'
               '</text:list></office:text></office:body></office:document-content>')
    with zipfile.ZipFile(tmp_path / "minutes.odt", "w") as odt:
        odt.writestr("mimetype", "application/vnd.oasis.opendocument.text")
        odt.writestr("content.xml", content)
    [note] = read_meetings(tmp_path / "minutes.odt")
    assert (note.date, note.values("presenter"), note.values("topic")) == (dt.date(2023, 10, 20), ["Ana Souza"],
                                                                          ["test-time adaptation"])
    [action] = note.actions
    assert (action.owner, action.value, action.due) == ("Bo Chen", "share the slides", "2023-10-27")


def test_an_mbox_gives_a_meeting_per_message_and_leaves_out_replies_to_a_message_it_holds(tmp_path):
    second = HTML_ONLY.replace("Subject: minutes", "Subject: Lab meeting 9/29/2023")
    thanks = ("From: Lea Dubois <lea@lab.example>\nSubject: Re: Lab meeting 9/29/2023\n"
              "Date: Sat, 30 Sep 2023 10:00:00 +0000\nContent-Type: text/plain\n\nThanks Bo!\n")
    box = "".join(f"From sender@lab.example Sat Sep 30 10:00:00 2023\n{m}\n" for m in (MINUTES, second, thanks))
    (tmp_path / "lab-list.mbox").write_text(box)
    meetings = read_meetings(tmp_path / "lab-list.mbox")
    assert [(m.date, m.values("presenter"), m.values("recorder")) for m in meetings] == [
        (dt.date(2023, 9, 22), ["Lea Dubois"], ["Ana Souza"]), (dt.date(2023, 9, 29), ["Tomasz Kowal"], ["Lea Dubois"])]
    assert meetings[1].date_source == "message 2: the first heading"


def test_a_markdown_table_of_talks_is_a_schedule_and_a_note_with_one_stays_a_note(tmp_path):
    (tmp_path / "talks.md").write_text("# Talk schedule, fall term\n\n| Date | Speaker | Title |\n|---|---|---|\n"
                                       "| 2023-09-01 | Lea Dubois | contrastive loss |\n| 2023-09-08 | Bo Chen | label smoothing |\n")
    assert [(m.date, m.values("presenter"), m.schedule) for m in read_meetings(tmp_path / "talks.md")] == [
        (dt.date(2023, 9, 1), ["Lea Dubois"], True), (dt.date(2023, 9, 8), ["Bo Chen"], True)]
    (tmp_path / "2023-09-08.md").write_text("# Lab meeting 2023-09-08\nRecorder: Ana Souza\n\nUpcoming:\n\n"
                                            "| Date | Speaker |\n|---|---|\n| 2023-09-15 | Sven Lindqvist |\n"
                                            "| 2023-09-22 | Tomasz Kowal |\n")
    [note] = read_meetings(tmp_path / "2023-09-08.md")
    assert (note.date, note.schedule, note.values("recorder")) == (dt.date(2023, 9, 8), False, ["Ana Souza"])
    report = SourceReport(str(tmp_path), "lab_notes")
    load_lab_notes(tmp_path, report, augment=AugmentConfig())
    assert [(n["file"], n["date"], n["facts"]) for n in report.notes] == [
        ("2023-09-08.md", "2023-09-08", {"recorder": 1, "presenter": 1, "topic": 1}),
        ("talks.md:5-5", "2023-09-01", {"presenter": 1, "topic": 1})]


def test_train_json_never_calls_a_day_a_file_is_dated_a_day_without_a_meeting(tmp_path):
    from conftest import TINY_RECIPE

    from labtune.recipe import load_recipe
    from labtune.stages.data import build_data
    from labtune.store.backends import LocalStore

    held = write_lab_folder(tmp_path / "notes")
    (tmp_path / "notes" / "Lab meeting 2024-01-19.pages").write_bytes(b"PK\x03\x04")
    recipe = load_recipe(TINY_RECIPE, [f"data.sources.0.path={tmp_path / 'notes'}", f"store.uri={tmp_path / 'store'}",
                                       "data.note_conversations=false", "data.augment.enabled=true",
                                       "data.augment.absent_ratio=5.0", "data.augment.absent_within_days=7",
                                       "data.augment.recite_month=true"])
    store = LocalStore(tmp_path / "store")
    train = json.loads((Path(build_data(recipe, store).uri) / "train.json").read_text())  # a local store's output folder
    dated = {m["date"] for m in held} | {dt.date(2024, 1, 19)}
    denied = {dt.datetime.strptime(r["conversations"][-1]["value"].split()[1], "%m/%d/%Y").date()
              for r in train if "there is no lab meeting" in r["conversations"][-1]["value"]}
    assert len(denied) >= 50  # the recipe draws five no-meeting dates a meeting
    assert not denied & dated


def test_a_pdf_and_a_slide_deck_are_read_like_notes(tmp_path):
    from pptx import Presentation

    write_pdf(tmp_path / "printed.pdf", ["Lab meeting 10/27/2023", "Presenter: Ana Souza", "Topic: federated training"])
    deck = Presentation()
    slide = deck.slides.add_slide(deck.slide_layouts[1])
    slide.shapes.title.text = "Lab meeting 2023-11-03"
    slide.placeholders[1].text = "Presenter: Bo Chen\nTopic: weak labels from reports"
    deck.save(tmp_path / "slides.pptx")
    read = [read_meetings(tmp_path / name)[0] for name in ("printed.pdf", "slides.pptx")]
    assert [(n.date, n.values("presenter"), n.values("topic")) for n in read] == [
        (dt.date(2023, 10, 27), ["Ana Souza"], ["federated training"]), (dt.date(2023, 11, 3), ["Bo Chen"], ["weak labels from reports"])]


def test_an_org_journal_entry_s_title_after_its_time_is_the_topic(tmp_path):
    (tmp_path / "journal.org").write_text("* Friday, 09/22/23\n** 10:00 Lab meeting: Contrastive loss for noisy labels\n"
                                          ":PROPERTIES:\n:PRESENTER: Lea Dubois\n:END:\n"
                                          "* Friday, 09/29/23\n** 10:00 Lab meeting\n:PROPERTIES:\n:PRESENTER: Bo Chen\n:END:\n"
                                          "Label smoothing in segmentation\nWe compared three settings.\n")
    assert [(m.date, m.values("topic")) for m in read_meetings(tmp_path / "journal.org")] == [
        (dt.date(2023, 9, 22), ["Contrastive loss for noisy labels"]), (dt.date(2023, 9, 29), ["Label smoothing in segmentation"])]


def test_an_e_mail_in_a_charset_python_does_not_know_is_still_read(tmp_path):
    (tmp_path / "odd.eml").write_text("From: Ana Souza <ana@lab.example>\nSubject: Lab meeting 9/22/2023\n"
                                      'Content-Type: text/plain; charset="x-no-such-charset"\n\nPresenter: Lea Dubois\n')
    [note] = read_meetings(tmp_path / "odd.eml")
    assert (note.date, note.values("presenter")) == (dt.date(2023, 9, 22), ["Lea Dubois"])
