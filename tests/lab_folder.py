"""A lab's notes kept the ways labs keep them (issue 43), written by the tests: 20 weekly meetings,
four in each of five forms. Facts are drawn from one table, so a test knows what each file says.

- an Org journal (one file): property drawers, the subject as the entry's first line, TODO items
  with an owner and a DEADLINE;
- Notion exports: Markdown whose file name ends in the 32-hex page id;
- Word files (.docx, as Word and Google Docs export them) with a two-column table;
- minutes sent by e-mail (.eml): the date in the Subject, the sender the note taker;
- short free notes in the seed's shape ("Recorder: X", an indented "X owns the Y, due D") beside a
  schedule.csv of date, presenter and topic.
"""

from __future__ import annotations

import datetime as dt
import zipfile
from pathlib import Path

PEOPLE = ["Lea Dubois", "Bo Chen", "Sven Lindqvist", "Ana Souza", "Tomasz Kowal"]
TOPICS = ["contrastive loss for noisy labels", "label smoothing in segmentation", "self-supervised CT pretraining",
          "active learning budgets", "calibration of ensembles", "federated training across sites",
          "synthetic data from diffusion", "uncertainty maps for radiologists", "test-time adaptation",
          "benchmark leakage audit", "annotation tool redesign", "weak labels from reports",
          "domain shift between scanners", "MICCAI rebuttal plan", "knowledge distillation for deployment",
          "graph networks for vessels", "data loader profiling", "privacy attacks on models",
          "curriculum learning schedules", "the lab's compute budget"]
TASKS = ["submit the MICCAI abstract", "rerun the ablation", "update the wiki", "order new GPUs", "draft the rebuttal",
         "clean the annotation export", "write the data card", "book the seminar room", "review the preprint",
         "fix the loader seed", "send the survey", "archive the old runs", "prepare the poster", "renew the IRB",
         "share the slides", "merge the eval branch", "label fifty scans", "email the collaborators",
         "benchmark the new kernel", "plan the retreat"]


def meetings() -> list[dict]:
    """The 20 meetings: date, presenter, recorder, topic, and one action item (owner, task, due)."""
    first = dt.date(2023, 9, 1)
    found = []
    for i in range(20):
        date = first + dt.timedelta(weeks=i)
        found.append({"date": date, "presenter": PEOPLE[i % 5], "recorder": PEOPLE[(i + 2) % 5], "topic": TOPICS[i],
                      "owner": PEOPLE[(i + 3) % 5], "task": TASKS[i], "due": date + dt.timedelta(days=7)})
    return found


def long_date(date: dt.date) -> str:
    return f"{date:%B} {date.day}, {date.year}"


def write_docx(path: Path, paragraphs: list[str], rows: list[list[str]] = ()) -> None:
    """A Word file as Word and Google Docs export it, its fields in a two-column table."""
    main = 'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'
    para = lambda text: f'<w:p><w:r><w:t xml:space="preserve">{text}</w:t></w:r></w:p>'  # noqa: E731
    table = "<w:tbl>" + "".join("<w:tr>" + "".join(f"<w:tc>{para(c)}</w:tc>" for c in row) + "</w:tr>" for row in rows) + "</w:tbl>"
    with zipfile.ZipFile(path, "w") as docx:
        docx.writestr("[Content_Types].xml", '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxml'
                      'formats.org/package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.'
                      'openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/>'
                      '<Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument'
                      '.wordprocessingml.document.main+xml"/></Types>')
        docx.writestr("_rels/.rels", '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxml'
                      'formats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxml'
                      'formats.org/officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/>'
                      '</Relationships>')
        docx.writestr("word/document.xml", f'<?xml version="1.0" encoding="UTF-8"?><w:document {main}><w:body>'
                      f'{"".join(para(p) for p in paragraphs)}{table if rows else ""}</w:body></w:document>')


def write_pdf(path: Path, lines: list[str]) -> None:
    """A one-page PDF whose text is `lines`, as a PDF printer writes one (Helvetica, a line each)."""
    text = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) '" for line in lines) + " ET"
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
               f"<< /Length {len(text)} >>\nstream\n{text}\nendstream", "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode() + b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)


def write_lab_folder(folder: Path) -> list[dict]:
    """The folder (created), and the meetings it holds."""
    folder.mkdir(parents=True, exist_ok=True)
    held = meetings()
    org = ["#+TITLE: Imaging group journal", ""]
    for m in held[0:4]:
        org += [f"* {m['date']:%Y-%m-%d %a}", ":PROPERTIES:", f":PRESENTER: {m['presenter']}",
                f":NOTE_TAKER: {m['recorder']}", ":END:", m["topic"][0].upper() + m["topic"][1:], "Discussion went long; slides on the drive.",
                f"** TODO {m['owner']}: {m['task']}", f"   DEADLINE: <{m['due']:%Y-%m-%d %a}>", ""]
    (folder / "journal.org").write_text("\n".join(org))
    for n, m in enumerate(held[4:8]):
        page = f"{n:x}" * 32
        (folder / f"Lab Meeting {m['date']:%b %d} {page[:32]}.md").write_text(
            f"# Lab Meeting {m['date']:%b %d}\n\nDate: {long_date(m['date'])}\nPresenter: {m['presenter']}\n"
            f"Note taker: {m['recorder']}\nTopic: {m['topic']}\n\n## Action items\n\n"
            f"- [ ] @{m['owner'].split()[0]} {m['task']} (due {m['due']:%b} {m['due'].day})\n")
    for m in held[8:12]:
        write_docx(folder / f"Minutes {m['date']:%d.%m.%Y}.docx", [f"Group meeting minutes, {long_date(m['date'])}"],
                   [["Presenter", m["presenter"]], ["Minutes", m["recorder"]], ["Topic", m["topic"]],
                    ["Action items", f"{m['owner']}: {m['task']}, due {long_date(m['due'])}"]])
    for m in held[12:16]:
        first = m["recorder"].split()[0].lower()
        (folder / f"minutes-{m['date']:%Y%m%d}.eml").write_text(
            f"From: {m['recorder']} <{first}@lab.example>\nTo: imaging-group@lab.example\n"
            f"Subject: Lab meeting {m['date']:%-m/%-d/%Y}\nDate: {m['date'] + dt.timedelta(days=1):%a, %d %b %Y} 09:00:00 +0000\n"
            f"Content-Type: text/plain; charset=utf-8\n\nHi all,\n\nPresenter: {m['presenter']}\nTopic: {m['topic']}\n\n"
            f"Action items:\n- {m['owner']}: {m['task']}, due {long_date(m['due'])}\n\nBest,\n{m['recorder'].split()[0]}\n")
    rows = ["date,presenter,topic"]
    for m in held[16:20]:
        rows.append(f"{m['date']:%Y-%m-%d},{m['presenter']},{m['topic']}")
        (folder / f"{m['date']:%Y-%m-%d}.txt").write_text(
            f"{m['date']:%-m/%-d/%Y}\nRecorder: {m['recorder']}\n    {m['owner']} owns {m['task'].split(' ', 1)[1]}, "
            f"due {m['due']:%B} {m['due'].day}\nNext week - {held[(held.index(m) + 1) % 20]['presenter']} presents.\n")
    (folder / "schedule.csv").write_text("\n".join(rows) + "\n")
    return held
