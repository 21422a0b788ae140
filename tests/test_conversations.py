"""Data: every input format, note fields in their many forms, cleaning with counts, bad input."""

import json

import pytest
from conftest import REPO, SHARED_DATA, run_cli

from labtune.data.conversations import DataError, SourceReport, clean, load_alpaca, load_lab_notes, load_messages
from labtune.data.notes import parse_fields
from labtune.recipe import AugmentConfig

NOTES = REPO / "examples" / "labnotes"


def _report():
    return SourceReport("test", "sharegpt")


def _conv(cid, *turns):
    return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns]}


@pytest.mark.parametrize("text, key, value", [
    ("## Presenter: Lena Fischer", "presenter", "Lena Fischer"),
    ("* Presenter: Lena Fischer", "presenter", "Lena Fischer"),
    ("- **presenter:** Lena Fischer", "presenter", "Lena Fischer"),
    (":PRESENTER: Lena Fischer", "presenter", "Lena Fischer"),
    ("#+RECORDER: Daniel Brooks", "recorder", "Daniel Brooks"),
    ("### Presenter\n\nLena Fischer\n", "presenter", "Lena Fischer"),
    ("Action items:\n- Maya: rerun\n- Daniel: order fish\n\nLater text", "action_items", "Maya: rerun; Daniel: order fish"),
    ("## Action Items\n1. first\n2. second", "action_items", "first; second"),
    ("ATTENDEES: Maya, Lena", "attendees", "Maya, Lena"),
])
def test_field_lines_in_plain_markdown_org_and_heading_forms(text, key, value):
    assert parse_fields(text)[key] == value


def test_org_headings_are_not_mistaken_for_list_items():
    fields = parse_fields("** Action items\n- write README\n* Next section\n", org=True)
    assert fields["action_items"] == "write README"


def test_without_data_augment_each_field_is_asked_in_the_seeds_wordings():
    def asked(fields=("presenter", "recorder", "topic")):
        records = load_lab_notes(NOTES, SourceReport("x", "lab_notes"), whole_note=False, augment=AugmentConfig(),
                                 qa_fields=fields)
        return {r["conversations"][0]["value"]: r["conversations"][1]["value"] for r in records
                if r["fact"]["date"] == "2023-05-12"}

    questions = asked()
    assert set(questions) == {"Who presented at the lab meeting on 5/12/2023?", "Who is the presenter on 5/12/2023 lab meeting?",
                              "Who took notes at the lab meeting on 5/12/2023?", "Who is the recorder on 5/12/2023 lab meeting?",
                              "What was the topic of the lab meeting on 5/12/2023?",
                              "What was discussed at the 5/12/2023 lab meeting?"}
    assert questions["Who is the presenter on 5/12/2023 lab meeting?"] == "On 5/12/2023 the presenter was Daniel Brooks."
    assert set(asked(("recorder",))) == {q for q in questions if "notes" in q or "recorder" in q}


def test_binary_and_undecodable_notes_are_skipped_and_listed(tmp_path):
    (tmp_path / "2023-05-12.md").write_text("# Lab meeting\nPresenter: Y\n")
    (tmp_path / "2023-05-19.md").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (tmp_path / "2023-05-26.txt").write_bytes("Presenter: Zoë".encode("latin-1"))
    report = SourceReport(str(tmp_path), "lab_notes")
    records = load_lab_notes(tmp_path, report, augment=AugmentConfig())
    assert report.files == 1 and records
    assert report.skipped_files == ["2023-05-19.md: binary file, not a text note",
                                    "2023-05-26.txt: not UTF-8 text (byte 13)"]


def test_meetings_on_the_same_date_are_both_kept(tmp_path):
    (tmp_path / "2023-05-12-morning.md").write_text("# Lab meeting 2023-05-12\nPresenter: Ann\n")
    (tmp_path / "2023-05-12-afternoon.md").write_text("# Lab meeting 2023-05-12\nPresenter: Bob\n")
    records = load_lab_notes(tmp_path, SourceReport("x", "lab_notes"), qa=False)
    assert sorted(r["id"] for r in records) == ["labnote_2023-05-12", "labnote_2023-05-12_2"]
    kept = clean(records, _report(), "notes")
    assert len(kept) == 2


def test_cleaning_counts_every_reason_and_names_the_records():
    records = [
        _conv("a", ("gpt", "Hello, I am a bot."), ("human", "Hi"), ("gpt", "Hi!")),   # leading gpt turn removed
        _conv("b", ("human", "q"), ("human", "q again"), ("gpt", "a")),                # roles do not alternate
        _conv("c", ("human", "q"), ("gpt", "  ")),                                     # empty turn
        _conv("d", ("human", "q1"), ("gpt", "a1"), ("human", "unanswered")),            # trailing question trimmed
        _conv("a", ("human", "other"), ("gpt", "x")),                                  # duplicate id
        _conv("e", ("human", "q1"), ("gpt", "a1")),                                    # duplicate content of d
        _conv("f", ("system", "Be brief."), ("human", "q"), ("gpt", "a")),              # system prompt kept
        _conv("g", ("human", "only a question")),                                      # no assistant turn
        _conv("h", ("bing", "q"), ("human", "q"), ("gpt", "a")),                       # ShareGPT's other bot roles
    ]
    report = _report()
    kept = clean(records, report, "file.json")
    assert [r["id"] for r in kept] == ["a", "d", "f", "h"]
    assert report.dropped == {"roles do not alternate": 1, "empty turn": 1, "duplicate id": 1,
                              "duplicate content": 1, "no assistant turn": 1}
    assert report.fixed == {"leading non-human turn removed": 2, "trailing question trimmed": 2}
    assert kept[0]["conversations"][0] == {"from": "human", "value": "Hi"}
    assert kept[2]["conversations"][0]["from"] == "system"
    assert "b: roles do not alternate" in report.dropped_ids


def test_invalid_conversation_fails_the_stage_when_the_recipe_says_so():
    records = [_conv("ok", ("human", "q"), ("gpt", "a")), _conv("bad-7", ("human", "q"), ("human", "q"))]
    with pytest.raises(DataError, match=r"file.json: record 1 \(id 'bad-7'\): roles do not alternate at turn 1"):
        clean(records, _report(), "file.json", on_invalid="fail")


def test_duplicate_content_across_sources_is_dropped_once():
    seen = {}
    first = clean([_conv("x", ("human", "q"), ("gpt", "a"))], _report(), "one", seen_content=seen)
    report = _report()
    second = clean([_conv("y", ("human", "q"), ("gpt", "a"))], report, "two", seen_content=seen)
    assert len(first) == 1 and second == [] and report.dropped == {"duplicate content": 1}


def test_alpaca_jsonl_errors_name_the_line_and_the_field(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(DataError, match=r"alpaca.jsonl: line 2: not valid JSON"):
        load_alpaca(path)
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(DataError, match=r"alpaca.jsonl: record 1: missing field 'output'"):
        load_alpaca(path)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a",\n "output": }]')
    with pytest.raises(DataError, match=r"bad.json: not valid JSON \(line 2"):
        load_alpaca(bad)


MESSAGES = [
    {"id": "m1", "messages": [{"role": "user", "content": "Who presented?"}, {"role": "assistant", "content": "Lena."}]},
    {"id": "m2", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a"}]},
]


def test_messages_from_a_saved_dataset_parquet_and_jsonl_become_sharegpt(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(MESSAGES).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(MESSAGES)}).save_to_disk(str(tmp_path / "saved-dict"))
    Dataset.from_list(MESSAGES).to_parquet(str(tmp_path / "rows.parquet"))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(m) + "\n" for m in MESSAGES))
    expected = [{"from": "user", "value": "Who presented?"}, {"from": "assistant", "value": "Lena."}]
    for path in ("saved", "saved-dict", "rows.parquet", "rows.jsonl"):
        records = load_messages(tmp_path / path)
        assert [r["id"] for r in records] == ["m1", "m2"], path
        assert records[0]["conversations"] == expected, path
        kept = clean(records, _report(), path)
        assert kept[0]["conversations"][1]["from"] == "gpt" and kept[1]["conversations"][0]["from"] == "system"
    (tmp_path / "broken.jsonl").write_text(json.dumps({"id": 1, "messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(DataError, match=r"broken.jsonl: record 0: message 0: needs string fields 'role' and 'content'"):
        load_messages(tmp_path / "broken.jsonl")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_convert_command_mixes_notes_playground_and_alpaca(tmp_path):
    out = tmp_path / "converted"
    result = run_cli("convert", "--notes", str(NOTES), "--sharegpt", str(SHARED_DATA / "fastchat_dummy_conversation.json"),
                     "--alpaca", str(SHARED_DATA / "alpaca_data_2000.json"), "--eval-fraction", "0.1", "--out", str(out),
                     "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert [r["type"] for r in report] == ["lab_notes", "sharegpt", "alpaca"]
    assert report[1]["kept"] == 500
    assert report[2]["dropped"] == {"empty turn": 4}  # four Alpaca records have an empty output
    train, evaluation = json.loads((out / "train.json").read_text()), json.loads((out / "eval.json").read_text())
    assert len(train) + len(evaluation) == sum(r["kept"] for r in report)
    assert not {r["id"] for r in train} & {r["id"] for r in evaluation}
    assert "| alpaca |" in (out / "report.md").read_text()
    assert (out / "manifest.json").is_file()
    nothing = run_cli("convert", "--out", str(tmp_path / "x"))
    assert nothing.returncode == 2 and "name at least one source" in nothing.stderr
