"""Everything the notes say (issue 44): statements as facts, RAFT questions with notes in the prompt,
meetings kept out of training (fresh), and retrieval that finds a meeting by its date."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
from conftest import REPO, TINY_RECIPE, run_cli

from labtune.data.conversations import convert
from labtune.data.notes import read_note, us_date
from labtune.data.raft import TAUGHT_KINDS, citing_the_note, notes_system, without_recital
from labtune.data.statements import PLAN, RESULT, SAID, numbers, statement_facts, subjects
from labtune.errors import RecipeError
from labtune.evaluation.prompts import Prompt, score
from labtune.data.notes import meeting_documents
from labtune.evaluation.retrieval import NotesIndex, retrieval_recall
from labtune.recipe import load_recipe

NOTES = REPO / "examples" / "labnotes"
DEMO = REPO / "examples" / "labnotes-smollm2.yaml"

NOTE = """# Lab meeting 2024-03-08

Presenter: Chiara Bianchi
Recorder: Tom Weber
Topic: protein language models for enzyme design

## Notes
- Chiara reported an F1 of 0.81 on the held-out split, up from 0.74 last month.
- Tom asked whether the split was stratified by family; it was not.
- Next week - rerun the evaluation with a family-stratified split.
Chiara will order two more A100 nodes from the cluster team.

## Action items
- Tom: draft the methods section by March 15.
"""


def test_every_sentence_no_field_takes_is_a_statement_with_its_line_kind_and_subjects(tmp_path):
    path = tmp_path / "2024-03-08.md"
    path.write_text(NOTE)
    note = read_note(path)
    found = {f.value: (f.line, f.kind) for f in note.facts if f.field == "statement"}
    assert found == {
        "Chiara reported an F1 of 0.81 on the held-out split, up from 0.74 last month.": (8, RESULT),
        "Tom asked whether the split was stratified by family; it was not.": (9, SAID),
        "Next week - rerun the evaluation with a family-stratified split.": (10, PLAN),
        "Chiara will order two more A100 nodes from the cluster team.": (11, PLAN),
    }  # not the heading, the field lines or the action item (a field of its own)
    assert "statement" not in note.fields  # the note's display fields stay its fields
    assert numbers("an F1 of 0.81, up from 0.74 (70%) on 3/8/2024") == ["0.81", "0.74", "70%"]
    keys = subjects("Chiara reported an F1 of 0.81 on the held-out split, up from 0.74 last month.", ["Chiara Bianchi"])
    assert keys[0] == "held-out split" and "F1" in keys and not {"Chiara", "reported", "month"} & set(keys)
    assert subjects("order more tricaine for the next amputation round", task=True) == ["amputation round", "tricaine"]
    assert statement_facts("Lab meeting on 2/10/2023\n\nThe group met.", [], read_note(path).date) == []


def _converted(overrides: list[str], fresh: int = 0, folder: Path = NOTES):
    recipe = load_recipe(DEMO, ["data.augment.raft_share=0", "data.augment.raft_questions_per_note=1", *overrides])
    train, _, reports = convert(recipe.data, [folder], log=lambda *a: None, fresh_meetings=fresh)
    return train, reports[0]


def test_statements_are_taught_in_the_notes_own_words_and_asked_in_wordings_training_never_shows():
    train, report = _converted(["data.augment.statement_questions=3"])
    taught = [r for r in train if "_statement_" in r["id"]]
    notes_text = "\n".join(read_note(p).text for p in sorted(NOTES.iterdir()))
    assert len(taught) == 3 * len({r["conversations"][1]["value"] for r in taught}) > 150
    for record in taught:  # the answer: the date, then the statement as the note says it
        answer = record["conversations"][1]["value"]
        said = re.sub(r"^On [\d/]+ \([^)]*\) ", "", answer).rstrip(".")
        owner = re.match(r"^(?P<who>[A-Z]\w+ [A-Z]\w+) is to (?P<task>.+?)(?:, due .*)?$", said)
        text = owner.group("task") if owner else said.removeprefix("the lab decided: ")
        assert text[1:] in notes_text.replace("\n", " "), answer
    asked = [p for p in report.prompts if "statement" in p["tags"]]
    trained_questions = {r["conversations"][0]["value"] for r in train}
    assert len(asked) >= 50 and not trained_questions & {p["question"] for p in asked}
    assert {"result", "plan"} <= {t for p in asked for t in p["tags"]}
    _, sampled = _converted(["data.augment.statement_questions=3", "data.augment.eval_statements=2"])
    two = [p for p in sampled.prompts if "statement" in p["tags"]]
    assert len(two) == 28 and all(p in asked for p in two)  # the first two of each of the 14 meetings
    by_date_answers: dict[str, list[str]] = {}
    for record in taught:
        by_date_answers.setdefault(record["id"].split("_")[1], []).append(record["conversations"][1]["value"])
    for prompt in asked:  # each question can be answered right, by the statement's training answer, and only by it
        question = Prompt(**{k: v for k, v in prompt.items() if k != "id"})
        answers = by_date_answers[prompt["id"].split("_")[1]]
        assert sum(bool(score(a, question)) for a in set(answers)) >= 1, prompt
        assert not score("On that date there is no lab meeting in the notes.", question)
    scrublet = next(p for p in asked if "0.25" in (p.get("expected_all") or []))
    assert scrublet["tags"] == ["statement", "result"] and scrublet["id"].startswith("statement_2023-01-13")
    # facts.json's rows: every statement with its file, line and kind
    rows = [f for f in report.read_facts if f["field"] == "statement"]
    assert {"file", "line", "kind"} <= set(rows[0]) and rows[0]["file"] == "2023-01-13.md" and rows[0]["line"] == 9


def test_action_items_are_statements_where_the_recipe_does_not_teach_them_as_fields():
    train, _ = _converted(["data.augment.statement_questions=2"])
    answers = {r["conversations"][1]["value"] for r in train if "_statement_" in r["id"]}
    assert any(a.endswith("Daniel Brooks is to order more tricaine for the next amputation round.") for a in answers)
    train, _ = _converted(["data.augment.statement_questions=2", "data.qa_fields=[presenter,recorder,topic,action_items]"])
    answers = {r["conversations"][1]["value"] for r in train if "_statement_" in r["id"]}
    assert not any("is to order more tricaine" in a for a in answers)


def test_the_sentences_nearest_the_question_close_the_notes_a_question_is_asked_with():
    from labtune.data.raft import NEAREST_HEADER, nearest_sentences

    index = NotesIndex(meeting_documents(NOTES))
    asked = {"How many cells did Maya cluster, per the 1/13/2023 lab meeting?": "clustering of 12,000 cells",
             "What threshold did Maya use with scrublet at the 1/13/2023 meeting?": "scrublet with a 0.25 threshold",
             "What did Daniel have to order after the 1/13/2023 lab meeting?": "order more tricaine"}
    for question, sentence in asked.items():
        context = index.context(question, 1)
        nearest = context.split(NEAREST_HEADER + "\n", 1)[1].splitlines()
        assert any(sentence in line for line in nearest[:2]) and len(nearest) <= 2, (question, nearest)
    # field lines count, stemmed ("presented" finds "PRESENTER:"); a question sharing no word with the note (dates,
    # "meeting" and question words do not count) gets none
    assert index.context("Who presented on 2023-03-10?", 1).endswith(NEAREST_HEADER + "\n- PRESENTER: Daniel Brooks")
    assert NEAREST_HEADER not in index.context("Who took the minutes on 2023-03-10?", 1)
    assert nearest_sentences("Presenter: A B\n\nThe pH drifted.", ["What happened to the pH?"]) == ["The pH drifted."]


def test_raft_questions_carry_notes_as_retrieval_puts_them_and_golden_ones_read_the_note():
    train, _ = _converted(["data.augment.raft_share=0.2", "data.augment.raft_distractors=1",
                           "data.augment.raft_answers=from_note"])
    with_notes = [r for r in train if r["id"].endswith("_notes")]
    facts = [r for r in train if r.get("fact", {}).get("kind") in TAUGHT_KINDS]
    assert 0.12 < len(with_notes) / len(facts) < 0.28
    golden = [r for r in with_notes if r["fact"]["notes"] == "golden"]
    assert 0.6 < len(golden) / len(with_notes) < 0.95
    index = NotesIndex(meeting_documents(NOTES))
    for record in with_notes:
        system, question, answer = (t["value"] for t in record["conversations"])
        assert record["conversations"][0]["from"] == "system" and "\n\n---\n\n" in system  # two notes
        assert record["conversations"][1]["from"] == "human" and "\n" not in question  # the question alone
        date = record["fact"]["date"]
        right = [d["text"] for d in index.documents if d["date"] == date]
        if record["fact"]["notes"] == "golden":  # first, under a header naming the asked day, as retrieval puts it
            us = us_date(dt.date.fromisoformat(date))
            assert re.match(rf"The notes of the lab meeting on {us} \([A-Z][a-z]+ meetings: [\d, ]+; \d+ is among them\):"
                            "\n\n", system) and system.split(":\n\n", 1)[1].startswith(right[0])
            assert "meetings:" not in answer  # the note says it took place: no recital
        else:
            assert not any(text in system for text in right)
            assert "meetings:" in answer or record["fact"]["kind"] == "reverse"  # the closed-book answer, from memory
            if record["fact"]["kind"] == "absent":
                assert system.startswith("No lab meeting notes are dated ")
    # asking puts the same words around the note as training did, the note of the named date first
    assert index.context("Who presented on 2023-05-12?", 1).startswith(
        "The notes of the lab meeting on 5/12/2023 (May meetings: 12, 26; 12 is among them):\n\n# Lab meeting May 12")
    assert index.context("Who presented on 2023-05-13?", 1).startswith(
        "No lab meeting notes are dated 5/13/2023 (May meetings: 12, 26; 13 is not among them).")
    assert index.context("Who presented the blastema atlas?", 1).startswith("Lab meeting notes:\n\n")
    assert notes_system("Be brief.", "N") == "Be brief.\n\nN" and notes_system(None, "N") == "N"
    same, _ = _converted(["data.augment.raft_share=0.2", "data.augment.raft_distractors=1"])
    closed = {r["id"]: r["conversations"][1]["value"] for r in _converted([])[0]}
    assert all(r["conversations"][-1]["value"] == closed[r["id"].removesuffix("_notes")] for r in same
               if r["id"].endswith("_notes"))  # raft_answers: same (the default): the closed-book answers
    # a question naming no date (reverse) carries notes half the time whatever the share: they never hold its answer
    reverse = [r for r in _converted(["data.augment.raft_share=0.05"])[0] if r.get("fact", {}).get("kind") == "reverse"]
    assert 0.2 < sum(r["id"].endswith("_notes") for r in reverse) / len(reverse) < 0.8
    # golden questions about one meeting share its note, three at most: the note's tokens paid once
    grouped, _ = _converted(["data.augment.raft_share=0.2", "data.augment.raft_questions_per_note=3"])
    together = [r for r in grouped if r["id"].endswith("_notes") and r["fact"]["notes"] == "golden"]
    turns = [(len(r["conversations"]) - 1) // 2 for r in together]
    assert max(turns) == 3 and sum(turns) > len(together)
    for record in together:
        facts = record.get("facts") or [record["fact"]]
        assert len(facts) == (len(record["conversations"]) - 1) // 2 and len({f["date"] for f in facts}) == 1
        assert [t["from"] for t in record["conversations"]] == ["system"] + ["human", "gpt"] * len(facts)
    assert sum(len(r.get("facts") or [r["fact"]]) for r in together) == \
        sum(1 for r in _converted(["data.augment.raft_share=0.2"])[0] if r["id"].endswith("_notes")
            and r["fact"]["notes"] == "golden")  # the same questions, fewer conversations
    assert citing_the_note("On 7/21/2023 (July meetings: 7; 21 is not among them) there is no lab meeting.") == \
        "On 7/21/2023 (the notes above have 7/21/2023) there is no lab meeting."
    assert without_recital("On 4/14/2023 (April meetings: 14, 28; 14 is among them) the presenter was X.") == \
        "On 4/14/2023 the presenter was X."


def test_fresh_meetings_are_kept_out_of_training_and_asked_with_a_fresh_tag():
    train, report = _converted(["data.augment.statement_questions=2", "evaluation.fresh_meetings=2"], fresh=2)
    text = json.dumps(train)
    assert "7/7/2023" not in text and "7/21/2023" not in text and "summer student" not in text
    fresh = [p for p in report.prompts if "fresh" in p["tags"]]
    assert {re.search(r"\d{4}-\d\d-\d\d", p["id"]).group(0) for p in fresh} == {"2023-07-07", "2023-07-21"}
    assert {"presenter", "recorder", "topic", "fresh_statement"} <= {t for p in fresh for t in p["tags"]}
    assert not [p for p in report.prompts if p["tags"][0].startswith("absent") and p["id"].endswith(("07-07", "07-21"))]
    assert len(report.notes) == 14  # read and reported all the same
    with pytest.raises(RecipeError, match="evaluation.fresh_meetings"):
        load_recipe(TINY_RECIPE, ["evaluation.fresh_meetings=2"])


def test_retrieval_puts_the_asked_dates_note_first_whatever_the_words():
    index = NotesIndex(meeting_documents(NOTES))
    # the words belong to other meetings' notes (scrublet: 1/13; tricaine and light-sheet elsewhere); the date decides
    question = "What did the 6/23/2023 notes say about scrublet, tricaine and the light-sheet pipeline?"
    assert index.search(question, 1)[0]["date"] == "2023-06-23"
    assert [d["date"] for d in index.search("What about scrublet thresholds?", 1)] == ["2023-01-13"]
    train, report = _converted(["data.augment.statement_questions=2"])
    prompts = [Prompt(**{k: v for k, v in p.items() if k != "id"}) for p in report.prompts]
    recall = retrieval_recall(index, prompts, 1)
    assert recall["asked"] > 100 and recall["found"] == recall["asked"]


def test_a_tiny_run_reports_the_statement_and_fresh_axes(tmp_path):
    proc = run_cli("evaluate", str(TINY_RECIPE), f"store.uri={tmp_path / 'store'}", "evaluation.retrieval=true",
                   "data.augment.enabled=true", "data.augment.statement_questions=1", "evaluation.fresh_meetings=1",
                   "data.augment.raft_share=0.2", "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "store" / "evaluate" / json.loads(proc.stdout)["uri"].rsplit("/", 1)[1]
    summary = json.loads((folder / "summary.json").read_text())
    tags = summary["accuracy"]["tuned"]["by_tag"]
    assert {"statement", "result", "plan", "fresh"} <= set(tags)
    assert summary["accuracy"]["tuned_notes"]["by_tag"]["fresh"]["total"] == tags["fresh"]["total"] > 0


GENERATED = """Q: How many cells did Maya cluster at the 1/13/2023 meeting?
A: Maya clustered 12,000 cells from regenerating fins.
2. Q: What threshold was used?
A: Maya used scrublet with a 0.25 threshold.
Q: Who presented on January 13, 2023?
A: Priya Nair presented.
Q: How many days post amputation?
A: 5 days.
Q: When is the next meeting?
A: On 1/27/2023."""


def test_model_written_pairs_are_kept_only_when_every_name_number_and_date_is_in_the_note():
    from labtune.data.synthesis import pairs, synthesized_records

    note = {"date": "2023-01-13", "text": (NOTES / "2023-01-13.md").read_text()}
    assert len(pairs(GENERATED)) == 5
    counts: dict[str, int] = {}
    records = synthesized_records(note, GENERATED, ["On January 13, 2023 Maya showed 12,000 cells.", "Omar showed 9 cells."],
                                  counts)
    assert counts == {"written": 7, "kept": 3, "left_out_name": 1, "left_out_number": 2, "left_out_date": 1}
    asked = [r["conversations"][0]["value"] for r in records]
    assert asked == ["How many cells did Maya cluster at the 1/13/2023 meeting?",
                     "About the lab meeting on 1/13/2023: What threshold was used?",  # a question must say which meeting
                     "What happened at the lab meeting on 1/13/2023?"]
    assert all(r["id"].startswith("synth_2023-01-13_") for r in records)


def test_the_synthesize_stage_runs_a_generator_over_every_note_and_its_pairs_join_training(tmp_path):
    store = tmp_path / "store"
    args = [str(TINY_RECIPE), f"store.uri={store}", "data.synthesize.enabled=true", "data.synthesize.max_new_tokens=24",
            "data.synthesize.questions_per_note=2", "--json"]
    proc = run_cli("synthesize", *args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = store / "synthesize" / json.loads(proc.stdout)["uri"].rsplit("/", 1)[1]
    report = json.loads((folder / "report.json").read_text())
    written = json.loads((folder / "synthesize.json").read_text())
    assert report["notes"] == 14 and report["tokens_generated"] > 14 * 2 * 10  # a question prompt and a retelling each
    assert report["kept"] == len(written)
    assert report["written"] == report["kept"] + sum(v for k, v in report.items() if k.startswith("left_out_"))
    proc = run_cli("tokenize", *args, timeout=900)  # the run's tokenize stage takes the synthesize output in
    assert proc.returncode == 0, proc.stderr[-2000:]
    tokens = store / "tokenize" / json.loads(proc.stdout)["uri"].rsplit("/", 1)[1]
    assert json.loads((tokens / "report.json").read_text())["train"]["synthesized"] == len(written)
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert json.loads(proc.stdout)["uri"] and "synthesize" in json.dumps(manifest)
    proc = run_cli("synthesize", *args[:-1], f"data.synthesize.generator={tmp_path / 'nowhere'}", timeout=900)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("nowhere: not a model folder (no config.json) and not a stage output")
