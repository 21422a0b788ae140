"""Notes as labs write them (tests/notes/messy: one case per file): dates in every form and
place, the field names labs use in every line shape, prose, co-presenters, action items, the
ambiguous-date flag, the no-date message and nothing invented."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from conftest import REPO, TINY_RECIPE, run_cli

from labtune.data import augment, heldout, wordings
from labtune.data.conversations import SourceReport, load_lab_notes
from labtune.data.note_dates import find_dates
from labtune.data.notes import NO_DATE, NoteError, read_note
from labtune.errors import RecipeError
from labtune.recipe import AugmentConfig, load_recipe

MESSY = REPO / "tests" / "notes" / "messy"

# file: (date, where it was read, presenters, recorder, topic, [(owner, task, due)])
CASES = {
    "2023.03.10.txt": ("2023-03-10", "line 1", ["Keiko Tanaka"], "Mateo Silva", "sparse attention kernels", []),
    "fri-17-mar.md": ("2023-03-17", "the first heading", ["Hannah Müller", "Wei Zhang"], "Ines Duarte",
                      "mixture-of-experts routing", []),
    "group-meeting-c.md": ("2023-03-24", "the first heading", ["Omar Haddad"], "Lucia Romano",
                           "retrieval-augmented decoding", []),
    "weekly-notes-d.md": ("2023-03-31", "a Date: field", ["Tomasz Kowal"], "Priya Nair", "contrastive pretraining", []),
    "20230407.md": ("2023-04-07", "the file name", ["Sven Larsen"], "Keiko Tanaka", "ACL camera-ready checklist",
                    [("Sven Larsen", "the ACL camera-ready", "2023-04-21")]),
    "2023-04-14.md": ("2023-04-14", "the first heading", ["Keiko Tanaka"], "Mateo Silva", "sparse attention kernels",
                      [("Tomasz Kowal", "draft the KDD related-work section", "2023-05-17")]),
    "2023-04-21.txt": ("2023-04-21", "line 1", [], "yuzhi", None, []),
    "2023-04-28.org": ("2023-04-28", "the first heading", ["Wei Zhang"], "Hannah Müller", "quantization-aware training",
                       [("Wei Zhang", "email the reviewers", "2023-05-02")]),
    "2023-05-05.md": ("2023-05-05", "the first heading", ["Omar Haddad", "Priya Nair"], "Sven Larsen", "evaluation harness",
                      [("Priya Nair", "prepare the benchmark tables", "2023-06-12")]),
    "notes-b.md": ("2023-03-04", "the first heading", ["Mateo Silva"], "Omar Haddad", "tokenizer ablations", []),
    "2023-05-12.md": ("2023-05-12", "the first heading", [], None, None, []),
    "07-03-2023.md": ("2023-07-03", "the file name", ["Lucia Romano"], "Omar Haddad", "speculative decoding", []),
    "20230702.md": ("2023-07-02", "the file name", ["Ines Duarte"], "Wei Zhang", "state-space models",
                    [("Wei Zhang", "rerun the evaluation", "2023-07-14")]),
    "2023-05-19.md": ("2023-05-19", "the first heading", ["Lucia Romano", "Tomasz Kowal"], "Keiko Tanaka",
                      "distillation results", []),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_messy_note_gives_its_date_fields_and_action_items(name):
    date, source, presenters, recorder, topic, actions = CASES[name]
    note = read_note(MESSY / name)
    assert (note.date.isoformat(), note.date_source) == (date, source)
    assert note.values("presenter") == presenters
    assert note.values("recorder") == ([recorder] if recorder else [])
    assert note.values("topic") == ([topic] if topic else [])
    assert [(a.owner, a.value, a.due) for a in note.actions if a.owner or a.due] == actions
    for fact in note.facts:  # every fact names the line it was read from
        assert fact.value.split()[0].lower() in (MESSY / name).read_text().splitlines()[fact.line - 1].lower() \
            or fact.field == "action_items" or fact.how == "prose"


def test_prose_facts_carry_their_sentence_and_roles_alone_make_facts():
    note = read_note(MESSY / "2023-04-14.md")
    prose = {(f.field, f.value, f.line) for f in note.facts if f.how == "prose"}
    assert prose == {("presenter", "Keiko Tanaka", 3), ("topic", "sparse attention kernels", 3), ("recorder", "Mateo Silva", 3)}
    # people named without a role: no presenter, no recorder
    assert not [f for f in read_note(MESSY / "2023-05-12.md").facts if f.field in ("presenter", "recorder")]


@pytest.mark.parametrize("text, presenter, recorder", [
    ("Lena presented the new imaging pipeline. Arjun took notes.", "Lena", "Arjun"),
    ("The talk was given by Sofia Rossi. Notes by Maya Okafor.", "Sofia Rossi", "Maya Okafor"),
    ("Daniel gave the talk on enhancer screens; minutes were kept by Lena Fischer.", "Daniel", "Lena Fischer"),
    ("Omar Haddad was the speaker today. Priya was the scribe.", "Omar Haddad", "Priya"),
    ("We talked about budgets. Lena asked about doublets. Everyone agreed.", None, None),
    ("Next week Maya will present.", None, None),  # a plan, not who presented
])
def test_role_sentences(tmp_path, text, presenter, recorder):
    (tmp_path / "2023-05-12.md").write_text(f"# Lab meeting 2023-05-12\n\n{text}\n")
    note = read_note(tmp_path / "2023-05-12.md")
    assert note.values("presenter") == ([presenter] if presenter else [])
    assert note.values("recorder") == ([recorder] if recorder else [])


@pytest.mark.parametrize("line, date", [
    ("# Lab meeting 2023.03.10", "2023-03-10"), ("Fri 17 Mar 2023", "2023-03-17"), ("3/24/23", "2023-03-24"),
    ("20230702", "2023-07-02"), ("<2023-01-27 Fri>", "2023-01-27"), ("Friday, April 14, 2023", "2023-04-14"),
    ("12th May 2023", "2023-05-12"), ("the 14th of april 2023", "2023-04-14"), ("MARCH 3 2023", "2023-03-03"),
    ("Jan 13 '23", "2023-01-13"), ("13.1.2023", "2023-01-13"), ("2023/05/12", "2023-05-12"),
    ("version 1.2.3 on port 5000", None), ("2023/02/30", None), ("room 204, 10am", None),
])
def test_date_forms(line, date):
    found = find_dates(line)
    assert (found[0].date.isoformat() if found else None) == date


def test_day_month_order_and_the_ambiguous_date(tmp_path):
    note = read_note(MESSY / "notes-b.md")  # "03/04/2023"
    assert note.date == dt.date(2023, 3, 4) and note.other_date == dt.date(2023, 4, 3)
    assert read_note(MESSY / "notes-b.md", date_order="DMY").date == dt.date(2023, 4, 3)
    assert read_note(MESSY / "2023.03.10.txt", date_order="DMY").date == dt.date(2023, 3, 10)  # year first: always Y-M-D
    # a file name that agrees with the heading settles it
    (tmp_path / "2023-02-10.md").write_text("# Lab meeting 2/10/2023\nPresenter: Ann Lee\n")
    assert read_note(tmp_path / "2023-02-10.md").other_date is None
    report = SourceReport(str(MESSY), "lab_notes")
    load_lab_notes(MESSY, report, augment=AugmentConfig())
    flags = {n["file"]: n["flags"] for n in report.notes}
    assert flags["notes-b.md"] == ["date 2023-03-04 read as MDY; as DMY it would be 2023-04-03 (set data.date_order)"]
    assert flags["2023-05-12.md"] == ["no fields read: only its sentences, as statements"]


def test_a_note_without_a_date_says_what_was_looked_at():
    with pytest.raises(NoteError, match=f"undated.md: {NO_DATE}$"):
        read_note(MESSY / "undated.md")
    assert NO_DATE == "no date in the heading, the first 5 lines, a Date: field or the file name"


def test_a_recipe_adds_its_own_field_names(tmp_path):
    (tmp_path / "2023-05-12.md").write_text("# Gruppentreffen 2023-05-12\nVortrag: Jonas Weber\nProtokoll: Mia Braun\n")
    assert read_note(tmp_path / "2023-05-12.md").values("presenter") == []
    note = read_note(tmp_path / "2023-05-12.md", field_names={"presenter": ["Vortrag"], "recorder": ["Protokoll"]})
    assert note.values("presenter") == ["Jonas Weber"] and note.values("recorder") == ["Mia Braun"]
    recipe = load_recipe(TINY_RECIPE, ["data.field_names={presenter: [Vortrag]}"])
    assert recipe.data.field_names == {"presenter": ["Vortrag"]}
    with pytest.raises(RecipeError, match=r"data.field_names.speaker.\[key\]: Input should be .presenter."):
        load_recipe(TINY_RECIPE, ["data.field_names={speaker: [Vortrag]}"])
    with pytest.raises(RecipeError, match=r"data.field_names: presenter: '42' is not a word"):
        load_recipe(TINY_RECIPE, ["data.field_names={presenter: ['42']}"])


def test_a_value_that_is_not_a_name_is_no_presenter_and_is_named(tmp_path):
    (tmp_path / "2023-05-12.md").write_text("# Lab meeting 2023-05-12\nPresenter: see the shared slides, 3 decks\n"
                                            "## Minutes\n- The group discussed the budget at length.\n")
    note = read_note(tmp_path / "2023-05-12.md")
    assert note.values("presenter") == [] and note.values("recorder") == []
    assert note.rejected == ["line 2: Presenter: 'see the shared slides, 3 decks' is not a name"]


def test_co_presenters_are_each_a_fact_accepted_either_way_and_listed_in_reverse():
    notes = [read_note(MESSY / name) for name in ("fri-17-mar.md", "2023-05-05.md", "2023-04-28.org")]
    cfg = load_recipe(TINY_RECIPE, ["data.augment.enabled=true"]).data.augment
    prompts = heldout.eval_prompts(notes, cfg, 42)
    asked = [p for p in prompts if p["id"] == "paraphrase_2023-03-17_presenter"][0]
    assert asked["expected"] == ["Hannah Müller", "Wei Zhang"]
    assert "Wei Zhang" not in asked["forbidden"] and "Hannah Müller" not in asked["forbidden"]
    training = augment.training_conversations(notes, cfg, 42)
    reverse = {r["fact"]["value"]: r["conversations"][1]["value"] for r in training if r["fact"]["kind"] == "reverse"}
    assert reverse["Wei Zhang"] == "Wei Zhang presented on 3/17/2023, 4/28/2023."
    assert reverse["Hannah Müller"] == "Hannah Müller presented on 3/17/2023."


def test_action_items_train_and_are_asked_on_the_action_and_deadline_axes():
    notes = [read_note(MESSY / name) for name in sorted(CASES) if name != "2023-05-12.md"]
    cfg = load_recipe(TINY_RECIPE, ["data.augment.enabled=true"]).data.augment
    training = augment.training_conversations(notes, cfg, 42, actions=True)
    kinds = {(r["fact"]["field"], r["conversations"][1]["value"]) for r in training if r["fact"]["field"] in ("action", "deadline")}
    both = "On 4/14/2023 Tomasz Kowal is to draft the KDD related-work section, due 5/17/2023."
    assert ("action", both) in kinds and ("deadline", both) in kinds  # asked who or when: one answer gives both
    prompts = heldout.eval_prompts(notes, cfg, 42, training, actions=True)
    action = [p for p in prompts if "action" in p["tags"]]
    deadline = [p for p in prompts if "deadline" in p["tags"]]
    assert len(action) == 5 and len(deadline) == 5
    assert {"expected": ["5/17/2023"], "tags": ["deadline", "action_items"]}.items() <= \
        [p for p in deadline if "KDD" in p["question"]][0].items()
    trained_questions = {r["conversations"][0]["value"] for r in training}
    assert not trained_questions & {p["question"] for p in action + deadline}
    assert not [r for r in augment.training_conversations(notes, cfg, 42) if r["fact"]["field"] in ("action", "deadline")]


def test_the_answer_training_teaches_is_scored_right_on_each_held_out_question():
    """A model that learned its training answers word for word gets every held-out question right:
    no forbidden value hides inside the right one ("priya" in "Priya Nair") and a due-date answer
    may repeat its own meeting's date, which is another task's due date (examples/lab-styles)."""
    from pathlib import Path

    from labtune.data.notes import note_files, read_meetings, resolve_lab_names
    from labtune.evaluation.prompts import Prompt, score

    notes = resolve_lab_names([m for p in note_files(Path(REPO / "examples" / "lab-styles")) for m in read_meetings(p)])
    cfg = load_recipe(REPO / "examples" / "lab-styles-smollm2.yaml").data.augment
    training = augment.training_conversations(notes, cfg, 42, actions=True)
    taught: dict[tuple[str, str], list[str]] = {}
    for record in training:
        taught.setdefault((record["fact"]["date"], record["fact"]["field"]), []).append(record["conversations"][1]["value"])
    asked = [p for p in heldout.eval_prompts(notes, cfg, 42, training, actions=True)
             if {"paraphrase", "action", "deadline"} & set(p["tags"])]
    assert len(asked) >= 90
    for prompt in asked:
        field = "action" if "action" in prompt["tags"] else prompt["tags"][1] if "paraphrase" in prompt["tags"] else "deadline"
        date = prompt["id"].split("_")[1]
        question = Prompt(**{k: v for k, v in prompt.items() if k != "id"})
        answers = taught[(date, field)]
        if field in ("action", "deadline"):  # the answer about this task, not another task of the meeting
            task = prompt["question"].split("task to ")[-1].split(" from ")[0].split(", per")[0].split("?")[0]
            answers = [a for a in answers if task in a] or answers
        assert any(score(a, question) for a in answers), (prompt["question"], answers[:2])


def test_the_data_stage_shows_what_was_read(tmp_path):
    proc = run_cli("convert", "--notes", str(MESSY), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "14 notes read, 1 skipped, 1 with no fields (see report.md)"
    facts = json.loads((tmp_path / "out" / "facts.json").read_text())
    kdd = [f for f in facts if f["field"] == "action_items" and "KDD" in f["value"]][0]
    assert kdd == {"file": "2023-04-14.md", "line": 6, "date": "2023-04-14", "field": "action_items",
                   "value": "draft the KDD related-work section", "how": "action item", "owner": "Tomasz Kowal",
                   "due": "2023-05-17", "examples": 0}
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"- `{MESSY}`: undated.md: {NO_DATE}" in report
    assert "| notes-b.md | 2023-03-04 | the first heading | 1 | 1 | 1 | 0 | 0 | 0 | 0 | date 2023-03-04 read as MDY" in report
    assert "- `2023-05-12.md`: no fields read: only its sentences, as statements" in report


def test_messy_notes_meet_the_reading_targets():
    """A date for every note that has one; presenter, recorder, topic and action owner for at least
    90% of the meetings that state them."""
    notes = [read_note(MESSY / name) for name in CASES]
    stated = {field: [n for n, case in zip(notes, CASES.values()) if case[index]]
              for field, index in (("presenter", 2), ("recorder", 3), ("topic", 4), ("action", 5))}
    found = {field: sum(1 for n in group if (n.values(field) if field != "action" else [a for a in n.actions if a.owner]))
             for field, group in stated.items()}
    assert all(found[field] >= 0.9 * len(group) for field, group in stated.items()), found


def test_every_date_form_the_augmentation_writes_reads_back():
    days = [dt.date(2023, 5, 12), dt.date(2023, 1, 3), dt.date(2023, 11, 30), dt.date(2024, 2, 29)]
    forms = {**wordings.TRAIN_DATE_FORMS, **wordings.HELDOUT_DATE_FORMS}
    for day in days:
        for name, form in forms.items():
            found = find_dates(f"Lab meeting {form(day)}")
            assert found and found[0].date == day, (name, form(day))


def test_the_lab_styles_example_is_read_whole():
    """examples/lab-styles: 20 meetings in five styles, each stating presenter, recorder, topic and
    an action item with its owner and due date."""
    from labtune.data.notes import note_files

    notes = [read_note(path) for path in note_files(REPO / "examples" / "lab-styles")]
    assert len(notes) == 20 and len({n.date for n in notes}) == 20
    for field in ("presenter", "recorder", "topic"):
        assert sum(1 for n in notes if n.values(field)) >= 18, field
    assert sum(1 for n in notes if any(a.owner and a.due for a in n.actions)) >= 18
    load_recipe(REPO / "examples" / "lab-styles-smollm2.yaml")
