"""Data: lab notes, Alpaca and ShareGPT conversion, the mix and split, and loss masks."""

import datetime as dt
import json

import pytest
from conftest import REPO, SHARED_DATA, TINY_RECIPE

from labtune.data.chat import IGNORE_INDEX, encode_conversation, prompt_ids
from labtune.data.conversations import DataError, SourceReport, load_alpaca, load_sharegpt
from labtune.data.conversations import load_lab_notes as _load_lab_notes
from labtune.data.notes import parse_date, read_note
from labtune.recipe import AugmentConfig, load_recipe
from labtune.stages.data import build_data
from labtune.store.backends import LocalStore
from labtune.store.outputs import fetch


def load_lab_notes(folder, qa_pairs=True, whole_note=True, undated="skip"):
    return _load_lab_notes(folder, SourceReport(str(folder), "lab_notes"), qa=qa_pairs, whole_note=whole_note,
                           undated=undated, augment=AugmentConfig())

NOTES = REPO / "examples" / "labnotes"


@pytest.mark.parametrize("text, expected", [
    ("# Lab meeting 2023-05-12", dt.date(2023, 5, 12)),
    ("Lab meeting on 5/12/2023", dt.date(2023, 5, 12)),
    ("* Lab meeting <2023-05-12 Fri>", dt.date(2023, 5, 12)),
    ("# Lab meeting May 12, 2023", dt.date(2023, 5, 12)),
    ("Meeting of Sept. 3rd, 2024", dt.date(2024, 9, 3)),
    ("no date here", None),
])
def test_dates_in_every_supported_form(text, expected):
    assert parse_date(text) == expected


def test_sample_notes_cover_three_formats_and_parse_fields():
    files = sorted(NOTES.iterdir())
    assert len(files) >= 12 and {p.suffix for p in files} == {".md", ".org", ".txt"}
    notes = {n.date: n for n in map(read_note, files)}
    april = notes[dt.date(2023, 4, 14)]
    assert april.fields["presenter"] == "Lena Fischer"
    assert april.fields["recorder"] == "Daniel Brooks"
    assert notes[dt.date(2023, 3, 10)].fields["presenter"] == "Daniel Brooks"  # Org property drawer
    assert notes[dt.date(2023, 2, 24)].fields["topic"] == "grant renewal aims"  # **bold** Markdown field
    assert april.fields["action_items"].startswith("Lena Fischer: segment vessels")  # "## Action items" heading + list, owner resolved
    assert notes[dt.date(2023, 1, 27)].fields["action_items"].startswith("Lena Fischer: write the pipeline README")  # Org


def test_note_conversation_follows_fastchat_example_and_adds_qa():
    records = load_lab_notes(NOTES, qa_pairs=True)
    by_id = {r["id"]: r for r in records}
    seed = by_id["labnote_2023-04-14"]["conversations"]
    assert seed[0] == {"from": "human", "value": "Lab meeting on 4/14/2023"}
    assert seed[1]["value"].startswith("# Lab meeting 4/14/2023")
    qa = [r for r in records if r["id"].startswith("labnote_2023-04-14_")]
    assert any("Lena Fischer" in r["conversations"][1]["value"] for r in qa)
    assert len(load_lab_notes(NOTES, qa_pairs=False)) == len(list(NOTES.iterdir()))


def test_note_without_date_is_skipped_and_listed_or_fails_by_recipe(tmp_path):
    (tmp_path / "meeting.md").write_text("# Weekly sync\nPresenter: X\n")
    (tmp_path / "2023-05-12.md").write_text("# Lab meeting\nPresenter: Y\n")
    report = SourceReport(str(tmp_path), "lab_notes")
    records = _load_lab_notes(tmp_path, report, augment=AugmentConfig())
    assert {r["id"] for r in records} >= {"labnote_2023-05-12"} and report.files == 1
    assert report.skipped_files == ["meeting.md: no date in the heading, the first 5 lines, a Date: field or the file name"]
    with pytest.raises(DataError, match="meeting.md: no date in the heading"):
        load_lab_notes(tmp_path, qa_pairs=True, undated="fail")


def test_missing_notes_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="nowhere: lab-notes folder not found"):
        load_lab_notes(tmp_path / "nowhere", qa_pairs=True)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_fastchat_dummy_conversations_load_unchanged():
    source = SHARED_DATA / "fastchat_dummy_conversation.json"
    records = load_sharegpt(source)
    raw = json.loads(source.read_text())
    assert len(records) == len(raw) == 500
    assert [r["conversations"] for r in records] == [r["conversations"] for r in raw]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_alpaca_converts_like_fastchat():
    records = load_alpaca(SHARED_DATA / "alpaca_data_2000.json")
    raw = json.loads((SHARED_DATA / "alpaca_data_2000.json").read_text())
    assert len(records) == 2000
    with_input = next(i for i, r in enumerate(raw) if r["input"])
    assert records[with_input]["conversations"][0]["value"] == raw[with_input]["instruction"] + "\n" + raw[with_input]["input"]
    assert records[with_input]["conversations"][1] == {"from": "gpt", "value": raw[with_input]["output"]}
    assert records[0]["id"] == "alpaca_0"


def test_bad_sharegpt_record_is_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"id": "ok", "conversations": []}, {"id": "x1", "conversations": [{"from": "human"}]}]))
    with pytest.raises(DataError, match=r"bad.json: record 1 \(id 'x1'\): turn 0: missing field 'value'"):
        load_sharegpt(path)


def test_mix_weights_and_split_are_deterministic(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(40)]))
    overrides = [f"store.uri={tmp_path / 'store'}", "data.eval_fraction=0.25",
                 f"data.sources=[{{type: lab_notes, path: {NOTES}, eval_fraction: 0.0}}, {{type: alpaca, path: {alpaca}, weight: 0.5}}]"]
    recipe = load_recipe(TINY_RECIPE, overrides)
    store = LocalStore(tmp_path / "store")
    first = fetch(store, build_data(recipe, store).uri)
    train = json.loads((first / "train.json").read_text())
    evaluation = json.loads((first / "eval.json").read_text())
    report = json.loads((first / "report.json").read_text())
    assert report[0]["train"] == len(load_lab_notes(NOTES)) and report[0]["eval"] == 0
    assert report[1]["eval"] == 10 and report[1]["train"] <= 20
    assert not {r["id"] for r in evaluation} & {r["id"] for r in train}
    other = tmp_path / "store2"
    again = fetch(LocalStore(other), build_data(load_recipe(TINY_RECIPE, overrides[1:] + [f"store.uri={other}"]), LocalStore(other)).uri)
    assert (again / "train.json").read_text() == (first / "train.json").read_text()


CONVERSATION = [
    {"from": "human", "value": "Who presented on 4/14/2023?"},
    {"from": "gpt", "value": "Lena Fischer presented."},
    {"from": "human", "value": "And who recorded?"},
    {"from": "gpt", "value": "Daniel Brooks."},
]


def _labelled_text(tokenizer, encoded):
    return tokenizer.decode([t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX])


def test_loss_mask_vicuna_template_covers_only_assistant_turns(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    encoded = encode_conversation(tokenizer, CONVERSATION, 512)
    assert _labelled_text(tokenizer, encoded).replace(" ", "") == "LenaFischerpresented.</s>DanielBrooks.</s>"
    assert encoded["labels"][: len(prompt_ids(tokenizer, CONVERSATION[0]["value"]))] == \
        [IGNORE_INDEX] * len(prompt_ids(tokenizer, CONVERSATION[0]["value"]))
    assert encoded["input_ids"][0] == tokenizer.bos_token_id


def test_loss_mask_with_a_chatml_template(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
    encoded = encode_conversation(tokenizer, CONVERSATION, 512)
    labelled = _labelled_text(tokenizer, encoded)
    assert "Lena Fischer presented.<|im_end|>" in labelled and "Daniel Brooks.<|im_end|>" in labelled
    assert "Who presented" not in labelled and "user" not in labelled
    assert encoded["input_ids"][: len(prompt_ids(tokenizer, CONVERSATION[0]["value"]))] == \
        prompt_ids(tokenizer, CONVERSATION[0]["value"])


def test_note_conversations_can_be_left_out_for_qa_only_training():
    records = load_lab_notes(NOTES, qa_pairs=True, whole_note=False)
    assert records and all(r.get("fact") for r in records)  # questions only, no whole note
    # every sample note has presenter, recorder and topic, each asked in two wordings
    assert len(records) >= 6 * len(list(NOTES.iterdir()))


def test_notes_must_give_some_conversation():
    from labtune.errors import RecipeError

    with pytest.raises(RecipeError) as err:
        load_recipe(TINY_RECIPE, ["data.note_conversations=false", "data.qa_pairs=false"])
    assert str(err.value) == (f"{TINY_RECIPE}: data: note_conversations and qa_pairs are both false: "
                              "lab notes would give no conversations")
