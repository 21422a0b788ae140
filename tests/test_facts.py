"""Facts in many forms (labtune/data/augment.py), the four evaluation axes, the names scorer and the
notes-retrieval baseline."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil

import pytest
from conftest import REPO, TINY_RECIPE, run_cli

from labtune.data import augment, heldout, note_fields, wordings
from labtune.data.notes import note_files, read_note, us_date
from labtune.errors import RecipeError
from labtune.evaluation.prompts import Prompt, score
from labtune.recipe import load_recipe

NOTES = REPO / "examples" / "labnotes"


def sample_notes():
    return [read_note(p) for p in note_files(NOTES)]


def test_without_recall_questions_the_evaluation_asks_only_what_training_never_saw_and_the_rest_unchanged():
    cfg = load_recipe(TINY_RECIPE).data.augment
    notes = sample_notes()
    every = heldout.eval_prompts(notes, cfg, 42)
    unseen = heldout.eval_prompts(notes, cfg.model_copy(update={"recall_questions": False}), 42)
    assert any("recall" in p["tags"] for p in every)
    assert unseen == [p for p in every if "recall" not in p["tags"]]


def test_augmentation_is_deterministic_and_seeded():
    cfg = load_recipe(TINY_RECIPE).data.augment
    notes = sample_notes()
    first = augment.training_conversations(notes, cfg, 42)
    assert first == augment.training_conversations(notes, cfg, 42)
    assert heldout.eval_prompts(notes, cfg, 42) == heldout.eval_prompts(notes, cfg, 42)
    assert first != augment.training_conversations(notes, cfg, 7)
    counts = {(f["date"], f["field"]): f["examples"] for f in augment.fact_counts(first) if f["kind"] == "recall"}
    assert len(counts) == 3 * len({n.date for n in notes}) and set(counts.values()) == {cfg.questions_per_fact}


def test_every_answer_opens_with_the_canonical_date():
    cfg = load_recipe(TINY_RECIPE).data.augment
    for record in augment.training_conversations(sample_notes(), cfg, 42):
        fact = record["fact"]
        if fact["date"]:
            date = dt.date.fromisoformat(fact["date"])
            assert record["conversations"][1]["value"].startswith(f"On {date.month}/{date.day}/{date.year} "), record


def test_recited_months_list_exactly_that_month_s_meetings_and_say_whether_the_day_is_among_them():
    cfg = load_recipe(TINY_RECIPE, ["data.augment.recite_month=true"]).data.augment
    notes = sample_notes()
    meetings = {n.date for n in notes}
    kinds = set()
    for record in augment.training_conversations(notes, cfg, 42):
        fact = record["fact"]
        if not fact["date"]:
            continue
        date = dt.date.fromisoformat(fact["date"])
        month = sorted(d for d in meetings if (d.year, d.month) == (date.year, date.month))
        listed = ", ".join(str(d.day) for d in month) or "none"
        verdict = f"{date.day} is among them" if date in month else f"{date.day} is not among them"
        opening = f"On {date.month}/{date.day}/{date.year} ({date.strftime('%B')} meetings: {listed}; {verdict}) "
        assert record["conversations"][1]["value"].startswith(opening), record
        assert (date in month) == (fact["kind"] != "absent")
        kinds.add((fact["kind"], listed == "none"))
    assert {("recall", False), ("absent", False), ("summary", False)} <= kinds
    assert augment.absent_answer(dt.date(2023, 8, 4), augment.month_calendar(notes)) == \
        "On 8/4/2023 (August meetings: none; 4 is not among them) there is no lab meeting in the notes."
    unchecked = load_recipe(TINY_RECIPE, ["data.augment.recite_month=true", "data.augment.recite_check=false"])
    assert augment.training_conversations(notes, unchecked.data.augment, 42)[0]["conversations"][1]["value"] \
        .split(")")[0].count(";") == 0
    plain = load_recipe(TINY_RECIPE).data.augment
    assert "meetings:" not in json.dumps(augment.training_conversations(notes, plain, 42))
    # the evaluation asks the same questions either way
    assert heldout.eval_prompts(notes, cfg, 42) == heldout.eval_prompts(notes, plain, 42)


def weekly_notes(weeks: int = 24, start: dt.date = dt.date(2023, 1, 6)):
    """Weekly meetings (four or five a month), as Note objects."""
    from labtune.data.notes import Note

    names = ["Yuzhi Chen", "Dmitri Volkov", "Amara Nwosu", "Kenji Watanabe", "Priya Raman", "Tomasz Zielinski"]
    return [Note(date=start + dt.timedelta(weeks=w), file=f"week{w}.md", text="",
                 fields={"presenter": names[w % 6], "recorder": names[(w + 2) % 6], "topic": f"weekly topic {w}"})
            for w in range(weeks)]


def test_a_meetings_presenter_and_recorder_are_asked_in_minimal_pairs():
    """The same sentence and date form for both roles of a meeting, only the role words differ;
    every wording is used about equally often across meetings."""
    cfg = load_recipe(TINY_RECIPE, ["data.augment.questions_per_fact=4"]).data.augment
    records = [r for r in augment.training_conversations(weekly_notes(), cfg, 42) if r["fact"]["kind"] in ("recall", "missing")]
    asked: dict[tuple[str, str], list[str]] = {}
    for r in records:
        asked.setdefault((r["fact"]["date"], r["fact"]["field"]), []).append(r["conversations"][0]["value"])

    def shape(field, question):
        return next(i for i, t in enumerate(wordings.TRAIN_TEMPLATES[field])
                    if re.fullmatch(re.escape(t).replace(re.escape("{d}"), "(.+)"), question))

    def date_of(field, question):
        template = wordings.TRAIN_TEMPLATES[field][shape(field, question)]
        return re.fullmatch(re.escape(template).replace(re.escape("{d}"), "(.+)"), question).group(1)

    uses = [0] * len(wordings.TRAIN_TEMPLATES["presenter"])
    for (date, field), questions in asked.items():
        if field != "presenter":
            continue
        recorded = asked[(date, "recorder")]
        assert [shape("presenter", q) for q in questions] == [shape("recorder", q) for q in recorded]
        assert [date_of("presenter", q) for q in questions] == [date_of("recorder", q) for q in recorded]
        assert len(set(date_of("presenter", q) for q in questions)) == 4  # four date forms per meeting
        for q in questions:
            uses[shape("presenter", q)] += 1
    assert sum(uses) == 24 * 4 and max(uses) - min(uses) <= 1
    assert len(wordings.TRAIN_TEMPLATES["presenter"]) == len(wordings.TRAIN_TEMPLATES["recorder"])


def test_a_recital_stays_bounded_however_many_meetings_a_month_has():
    calendar = augment.month_calendar(weekly_notes())
    january = augment.opening(dt.date(2023, 1, 3), calendar)
    assert january == "On 1/3/2023 (January meetings: 6, 13, 20, 27; 3 is not among them)"
    daily = augment.month_calendar([n for w in range(31) for n in weekly_notes(1, dt.date(2023, 3, 1) + dt.timedelta(days=w))])
    recited = augment.recited_days(dt.date(2023, 3, 15), daily)
    assert [d.day for d in recited] == [13, 14, 15, 16, 17] and len(recited) == augment.RECITE_LIMIT
    assert augment.opening(dt.date(2023, 3, 15), daily).endswith("(March meetings: 13, 14, 15, 16, 17; 15 is among them)")


def test_no_meeting_questions_cover_every_training_template_of_every_field():
    notes = weekly_notes()
    cfg = load_recipe(TINY_RECIPE, ["data.augment.recite_month=true", "data.augment.absent_ratio=2",
                                    "data.augment.absent_questions=1"]).data.augment
    records = augment.training_conversations(notes, cfg, 42)
    absent = [r for r in records if r["fact"]["kind"] == "absent"]
    asked = {(r["fact"]["field"], t) for r in absent for t in wordings.TRAIN_TEMPLATES[r["fact"]["field"]]
             if re.fullmatch(re.escape(t).replace(re.escape("{d}"), ".+"), r["conversations"][0]["value"])}
    assert asked == {(f, t) for f in note_fields.SHORT_FIELDS for t in wordings.TRAIN_TEMPLATES[f]}
    by_field = {f: sum(1 for r in absent if r["fact"]["field"] == f) for f in note_fields.SHORT_FIELDS}
    assert max(by_field.values()) - min(by_field.values()) <= 1  # in proportion to the real questions


def test_no_meeting_dates_are_asked_in_trained_and_held_out_wordings():
    notes = weekly_notes()
    cfg = load_recipe(TINY_RECIPE, ["data.augment.eval_absent_dates=8"]).data.augment
    prompts = heldout.eval_prompts(notes, cfg, 42)
    held = [p for p in prompts if "absent" in p["tags"]]
    trained = [p for p in prompts if "absent_trained" in p["tags"]]
    assert len(held) == len(trained) == 8
    assert {p["id"].rsplit("_", 1)[1] for p in held} == {p["id"].rsplit("_", 1)[1] for p in trained}
    stems = [t.split("{d}")[0] for ts in wordings.TRAIN_TEMPLATES.values() for t in ts]
    assert all(any(p["question"].startswith(s) for s in stems) for p in trained)
    assert not any(s and p["question"].startswith(s) for p in held for s in stems if len(s) > 12)
    training = json.dumps(augment.training_conversations(notes, cfg, 42))
    assert not any(f'"absent_{p["id"].rsplit("_", 1)[1]}' in training for p in trained)


def test_packed_conversations_keep_every_fact_once():
    cfg = load_recipe(TINY_RECIPE, ["data.augment.facts_per_conversation=4"]).data.augment
    single = augment.training_conversations(sample_notes(), cfg, 42)
    packed = augment.pack_turns(single, cfg.facts_per_conversation, 42)
    assert len(packed) == -(-len(single) // 4) and all(len(r["conversations"]) <= 8 for r in packed)
    assert sorted(t["value"] for r in packed for t in r["conversations"]) == \
        sorted(t["value"] for r in single for t in r["conversations"])
    assert augment.fact_counts(packed) == augment.fact_counts(single)
    assert augment.pack_turns(single, 1, 42) == single


def test_absent_dates_never_fall_on_a_meeting_and_eval_ones_are_never_trained():
    cfg = load_recipe(TINY_RECIPE).data.augment
    notes = sample_notes()
    meetings = {n.date for n in notes}
    trained = set(augment.training_absent_dates(notes, cfg, 42))
    asked = {dt.date.fromisoformat(p["id"].split("_", 1)[1]) for p in heldout.eval_prompts(notes, cfg, 42)
             if "absent" in p["tags"]}
    assert trained and asked and not (trained | asked) & meetings and not trained & asked


def test_each_no_meeting_date_is_asked_about_every_field_in_turn_within_two_weeks_of_a_meeting():
    cfg = load_recipe(TINY_RECIPE, ["data.augment.absent_ratio=3", "data.augment.absent_questions=3"]).data.augment
    notes = sample_notes()
    meetings = {n.date for n in notes}
    dates = augment.training_absent_dates(notes, cfg, 42)
    assert len(dates) == 3 * len(meetings)
    assert all(min(abs((d - m).days) for m in meetings) <= cfg.absent_within_days for d in dates)
    asked: dict[str, set[str]] = {}
    for record in augment.training_conversations(notes, cfg, 42):
        if record["fact"]["kind"] == "absent":
            asked.setdefault(record["fact"]["date"], set()).add(record["fact"]["field"])
            assert "no lab meeting" in record["conversations"][1]["value"]
    assert set(asked) == {d.isoformat() for d in dates}
    assert all(fields == set(note_fields.SHORT_FIELDS) for fields in asked.values())
    near = load_recipe(TINY_RECIPE, ["data.augment.absent_ratio=3", "data.augment.absent_within_days=4"]).data.augment
    near_dates = augment.training_absent_dates(notes, near, 42)
    assert len(near_dates) == 3 * len(meetings)
    assert max(min(abs((d - m).days) for m in meetings) for d in near_dates) == 4
    assert max(min(abs((d - m).days) for m in meetings) for d in dates) > 4


def test_the_yearless_date_form_is_trained_only_when_no_two_meetings_share_a_month_and_day(tmp_path):
    notes = sample_notes()
    forms = augment.train_date_forms(notes)
    assert augment.YEARLESS_FORM in forms and len(forms) == len(wordings.TRAIN_DATE_FORMS) + 1
    folder = tmp_path / "notes"
    shutil.copytree(NOTES, folder)
    (folder / "next-year.md").write_text("# Lab meeting 4/14/2024\n\n- Presenter: Maya Okafor\n")
    both_years = [read_note(p) for p in note_files(folder)]
    assert augment.YEARLESS_FORM not in augment.train_date_forms(both_years)
    cfg = load_recipe(TINY_RECIPE, ["data.augment.questions_per_fact=70"]).data.augment
    questions = [r["conversations"][0]["value"] for r in augment.training_conversations(both_years, cfg, 42)]
    assert any("April 14th 2024" in q for q in questions)
    assert not any(re.search(r"April 14(?![,t])", q) for q in questions)  # never "April 14" without its year


def test_no_held_out_template_or_date_form_reaches_a_training_example(tmp_path):
    store = tmp_path / "store"
    made = run_cli("data", str(TINY_RECIPE), f"store.uri={store}", "data.augment.enabled=true",
                   "data.augment.facts_per_conversation=3", "--json")
    assert made.returncode == 0, made.stderr
    out = json.loads(made.stdout)["uri"]
    train = json.loads((store / "data" / out.rsplit("/", 1)[1] / "train.json").read_text())
    prompts = json.loads((store / "data" / out.rsplit("/", 1)[1] / "eval_prompts.json").read_text())
    training_text = "\n".join(turn["value"] for record in train for turn in record["conversations"])
    forbidden = heldout.heldout_renderings(sample_notes())
    assert len(forbidden) > 40
    for text in forbidden:
        assert text not in training_text, text
    paraphrases = [p["question"] for p in prompts if "paraphrase" in p["tags"]]
    assert paraphrases and all(q not in training_text for q in paraphrases)
    assert {t for p in prompts for t in p["tags"][:1]} == {"recall", "paraphrase", "reverse", "absent", "absent_trained", "action",
                                                          "decision", "attendance"}
    # the recall prompts are questions training really showed
    assert all(p["question"] in training_text for p in prompts if "recall" in p["tags"])


def test_the_names_scorer():
    who = Prompt(question="Who presented on 4/14/2023?", expected="Lena Fischer", forbidden=["Sofia Rossi", "Maya Okafor"])
    assert score("Lena Fischer.", who) is True
    assert score("Lena Fischer and Sofia Rossi.", who) is False  # the right person and another: wrong
    assert score("Sofia Rossi.", who) is False
    assert score("lena fischer presented", who) is True
    absent = Prompt(question="Who presented on 4/21/2023?", expected=["no lab meeting"], forbidden=["Lena Fischer"])
    assert score("On 4/21/2023 there is no lab meeting in the notes.", absent) is True
    assert score("Lena Fischer. There is no lab meeting.", absent) is False  # names somebody
    assert score("Lena Fischer.", absent) is False
    reverse = Prompt(question="When did Maya present?", expected_all=["1/13/2023", "3/24/2023"])
    assert score("Maya Okafor presented on 1/13/2023, 3/24/2023.", reverse) is True
    assert score("Maya Okafor presented on 1/13/2023.", reverse) is False
    # a forbidden first name inside the expected full name cannot make the right answer wrong
    first = Prompt(question="Who presented on 4/14/2023?", expected=["Priya Nair"], forbidden=["priya", "Omar Haddad"])
    assert score("On 4/14/2023 the presenter was Priya Nair.", first) is True
    assert score("Priya Nair and Omar Haddad.", first) is False


def test_a_knob_out_of_range_fails_at_load_naming_the_key():
    for override, key in (("data.augment.questions_per_fact=0", "data.augment.questions_per_fact"),
                          ("data.augment.absent_ratio=-1", "data.augment.absent_ratio"),
                          ("data.augment.colour=red", "data.augment.colour"),
                          ("evaluation.retrieval_k=0", "evaluation.retrieval_k")):
        with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
            load_recipe(TINY_RECIPE, [override])


def test_two_meetings_on_one_date_are_both_kept_and_either_answer_counts(tmp_path):
    notes = tmp_path / "notes"
    shutil.copytree(NOTES, notes)
    (notes / "2023-04-14-second.md").write_text("# Lab meeting 4/14/2023\n\n- Presenter: Arjun Mehta\n"
                                                "- Recorder: Sofia Rossi\n- Topic: zebrafish husbandry\n")
    cfg = load_recipe(TINY_RECIPE).data.augment
    parsed = [read_note(p) for p in note_files(notes)]
    train = augment.training_conversations(parsed, cfg, 42)
    answers = {r["conversations"][1]["value"] for r in train if r["fact"]["date"] == "2023-04-14"
               and r["fact"]["field"] == "presenter"}
    assert len(answers) == 1
    assert set(answers.pop().rstrip(".").removeprefix("On 4/14/2023 the presenter was ").split(" and ")) == \
        {"Lena Fischer", "Arjun Mehta"}
    prompt = next(p for p in heldout.eval_prompts(parsed, cfg, 42) if p["id"] == "paraphrase_2023-04-14_presenter")
    assert set(prompt["expected"]) == {"Lena Fischer", "Arjun Mehta"}
    question = Prompt(**{k: v for k, v in prompt.items() if k != "id"})
    assert score("Arjun Mehta.", question) and score("Lena Fischer.", question)


def test_retrieval_finds_the_note_of_the_asked_date_in_any_form():
    from labtune.data.notes import meeting_documents
    from labtune.evaluation.retrieval import NotesIndex

    index = NotesIndex(meeting_documents(NOTES))
    for question in ("Who is the presenter on 4/14/2023 lab meeting?", "Which lab member gave the talk at the meeting held "
                     "on Friday, April 14, 2023?", "Who took notes on the 14th of April 2023?"):
        assert index.search(question, 1)[0]["date"] == "2023-04-14", question
    context = index.context("Who presented on 2023-05-12?", 2)
    assert "Daniel Brooks" in context and context.count("\n\n---\n\n") == 1


def test_recall_at_k_counts_the_questions_whose_meeting_note_reached_the_prompt():
    from labtune.evaluation.prompts import Prompt
    from labtune.data.notes import meeting_documents
    from labtune.evaluation.retrieval import NotesIndex, recall_line, retrieval_recall

    index = NotesIndex(meeting_documents(NOTES))
    asked = [Prompt(question="Who took notes on the 14th of April 2023?", expected="Daniel Brooks", tags=["recorder"]),
             Prompt(question="Who presented on 2023-05-12?", expected="Daniel Brooks", tags=["presenter"]),
             Prompt(question="Who presented on 2023-04-21?", expected="no lab meeting", tags=["absent"]),  # no note: not counted
             Prompt(question="When did Maya Okafor present?", expected="1/13/2023", tags=["reverse"])]  # no date: not counted
    recall = retrieval_recall(index, asked, 1)
    assert (recall["asked"], recall["found"], set(recall["by_tag"])) == (2, 2, {"recorder", "presenter"})
    assert recall_line(recall) == ("the asked meeting's note reached the prompt for 2 of 2 questions that name a meeting "
                                   "(recall@1 100%)")


def test_a_tiny_run_reports_four_columns_and_every_axis(tmp_path):
    proc = run_cli("evaluate", str(TINY_RECIPE), f"store.uri={tmp_path / 'store'}", "evaluation.retrieval=true",
                   "data.augment.enabled=true", "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "store" / "evaluate" / json.loads(proc.stdout)["uri"].rsplit("/", 1)[1]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["columns"] == ["base", "base_notes", "tuned", "tuned_notes"]
    for column in summary["columns"]:
        assert {"recall", "paraphrase", "reverse", "absent"} <= set(summary["accuracy"][column]["by_tag"])
    row = json.loads((folder / "answers.jsonl").read_text().splitlines()[0])
    assert {"base_notes_answer", "tuned_notes_answer", "base_notes_correct", "tuned_notes_correct"} <= set(row)
    retrieval = summary["retrieval"]  # the examples' notes are found by the date a question names
    assert retrieval["asked"] >= 40 and retrieval["found"] / retrieval["asked"] >= 0.9
    assert {"paraphrase", "presenter"} <= set(retrieval["by_tag"])
    from labtune.cli.pipeline import retrieval_rows
    from labtune.stages.evaluate import summary_markdown

    assert "Retrieval: the asked meeting's note reached the prompt for" in summary_markdown(summary, "uri")
    [row] = retrieval_rows(retrieval, summary["columns"])  # in the + notes columns only
    assert row[0].startswith("notes: the asked meeting's in the prompt") and [bool(c) for c in row[1:]] == [False, True, False, True]


def _all_prompts(notes, cfg):
    from labtune.evaluation.prompts import Prompt

    return [Prompt(**{k: v for k, v in p.items() if k != "id"}) for p in heldout.eval_prompts(notes, cfg, 42)]


def test_an_answer_that_knows_nothing_scores_nothing():
    """Read as an adversary would: a constant answer, or one that lists every name, date and topic
    after "no lab meeting", gets no question about a real meeting right."""
    notes = sample_notes()
    cfg = load_recipe(TINY_RECIPE, ["data.augment.enabled=true", "data.augment.eval_absent_dates=10"]).data.augment
    prompts = _all_prompts(notes, cfg)
    topics = [n.fields["topic"] for n in notes]
    everything = ("On 4/21/2023 there is no lab meeting in the notes. " + ", ".join(note_fields.people(notes)) + ". "
                  + ", ".join(us_date(n.date) for n in notes) + ". " + "; ".join(topics) + ".")
    real = [p for p in prompts if not {"absent", "absent_trained"} & set(p.tags)]
    for answer in (everything, "On 4/21/2023 there is no lab meeting in the notes.", "",
                   ", ".join(us_date(n.date) for n in notes), "; ".join(topics)):
        assert sum(score(answer, p) for p in real) == 0, answer
    assert not any(score(everything, p) for p in prompts)
    # one name for everything: right only where it is that person
    lena = sum(score("On 4/14/2023 the presenter was Lena Fischer.", p) for p in real)
    assert lena <= sum(1 for p in real if p.expected == ["Lena Fischer"]) + 1
    # a date inside another does not count
    reverse = [p for p in prompts if "reverse" in p.tags][0]
    assert score(", ".join("1" + d for d in reverse.expected_all), reverse) is False


def test_topic_keys_are_unique_within_the_notes():
    keys = augment.topic_keys(["journal club on macrophages in regeneration", "journal club on fin ray patterning",
                               "water quality", "single-cell RNA-seq of fins"])
    assert keys["journal club on macrophages in regeneration"] == "club on macrophages"
    assert keys["journal club on fin ray patterning"] == "club on fin"
    assert keys["water quality"] == "water quality" and keys["single-cell RNA-seq of fins"] == "single-cell RNA-seq of"
    assert len(set(keys.values())) == 4


def test_held_out_forms_stay_held_out_when_whole_notes_train(tmp_path):
    notes = tmp_path / "notes"
    shutil.copytree(NOTES, notes)
    first = notes / "2023-04-14.md"
    first.write_text(first.read_text().replace("# Lab meeting 4/14/2023", "# Lab meeting Friday, April 14, 2023", 1)
                     + "\nNext meeting: Friday, April 28, 2023 (2023/04/28).\n")
    store = tmp_path / "store"
    made = run_cli("data", str(TINY_RECIPE), f"store.uri={store}", f"data.sources.0.path={notes}", "data.augment.enabled=true",
                   "data.note_conversations=true", "data.augment.eval_absent_dates=30", "--json")
    assert made.returncode == 0, made.stderr
    out = store / "data" / json.loads(made.stdout)["uri"].rsplit("/", 1)[1]
    train = json.loads((out / "train.json").read_text())
    prompts = json.loads((out / "eval_prompts.json").read_text())
    text = "\n".join(turn["value"] for record in train for turn in record["conversations"])
    assert "Friday, April 14, 2023" in text  # the note says it ...
    rendered = [form(dt.date.fromisoformat(p["id"].rsplit("_", 2)[-2])) for p in prompts if "paraphrase" in p["tags"]
                for form in wordings.HELDOUT_DATE_FORMS.values()
                if form(dt.date.fromisoformat(p["id"].rsplit("_", 2)[-2])) in p["question"]]
    assert rendered and not [r for r in rendered if r in text]  # ... so no held-out question asks it that way
    assert not [p for p in prompts if "Friday, April 14, 2023" in p["question"] or "2023/04/28" in p["question"]]
    # a note that wrote the day in every held-out form leaves that day no held-out question
    day = dt.date(2023, 4, 14)
    seen = " ".join(form(day) for form in wordings.HELDOUT_DATE_FORMS.values())
    cfg = load_recipe(TINY_RECIPE, ["data.augment.enabled=true"]).data.augment
    asked = heldout.eval_prompts(sample_notes(), cfg, 42, seen=seen)
    assert not [p for p in asked if p["id"].startswith("paraphrase_2023-04-14")]
    assert [p for p in heldout.eval_prompts(sample_notes(), cfg, 42) if p["id"].startswith("paraphrase_2023-04-14")]
    absent = [dt.date.fromisoformat(p["id"].rsplit("_", 1)[1]) for p in prompts if "absent" in p["tags"]]
    assert absent and not [d for d in absent for form in wordings.HELDOUT_DATE_FORMS.values() if form(d) in text]
