"""Data: tokenization and loss masks (FastChat-equal for vicuna_v1.1), long-conversation splits,
multi-process tokenization, and the tokenize stage's cache."""

import json

import pytest
from conftest import SHARED_DATA, TINY_RECIPE, run_cli
from fastchat_reference import fastchat_preprocess, slow_tokenizer

from labtune.data.chat import IGNORE_INDEX, encode_conversation
from labtune.data.conversations import load_alpaca, load_sharegpt
from labtune.data.encode import split_conversation, tokenize_split
from labtune.recipe import load_recipe
from labtune.store.backends import LocalStore
from labtune.store.outputs import fetch


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
@pytest.mark.parametrize("kind", ["fast", "slow"])
def test_vicuna_masks_equal_fastchat_preprocess_on_its_dummy_conversations(tokenizer, tiny_model, kind):
    """FastChat's own preprocess, with the fast tokenizer and with LLaMA's slow SentencePiece one,
    labels exactly the tokens labtune labels, on FastChat's own dummy conversations."""
    records = load_sharegpt(SHARED_DATA / "fastchat_dummy_conversation.json")
    if kind == "slow":
        reference = slow_tokenizer(tiny_model, 1024)
    else:
        reference = tokenizer.__class__.from_pretrained(tokenizer.name_or_path, model_max_length=1024)
        reference.pad_token, reference.padding_side = reference.unk_token, "right"
    input_ids, targets = fastchat_preprocess([r["conversations"] for r in records], reference)
    for record, ids, target in zip(records, input_ids, targets):
        ours = encode_conversation(tokenizer, record["conversations"], template="vicuna_v1.1")
        n = len(ours["input_ids"])
        assert n < 1024 and int(ids.ne(reference.pad_token_id).sum()) == n
        assert ours["input_ids"] == ids[:n].tolist(), record["id"]
        assert ours["labels"] == target[:n].tolist(), record["id"]
        assert any(label != IGNORE_INDEX for label in ours["labels"])


def test_the_tiny_tokenizer_gives_the_same_ids_slow_and_fast(tokenizer, tiny_model):
    slow = slow_tokenizer(tiny_model, 1024)
    for text in ["Who is the Presenter on 4/14/2023 lab meeting?", "USER: hi ASSISTANT: two  spaces</s>",
                 "A chat.  USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: "]:
        assert slow(text).input_ids == tokenizer(text).input_ids, text


def _pairs(n, words=30):
    turns = []
    for i in range(n):
        turns += [{"from": "human", "value": f"question {i} " + "lab " * words},
                  {"from": "gpt", "value": f"answer {i} " + "meeting " * words}]
    return turns


def test_long_conversation_is_split_between_pairs_never_mid_answer(tokenizer):
    record = {"id": "long", "conversations": [{"from": "system", "value": "Be brief."}] + _pairs(6)}
    whole = encode_conversation(tokenizer, record["conversations"])
    one_pair = len(encode_conversation(tokenizer, record["conversations"][:3])["input_ids"])
    limit = 2 * one_pair + 10
    assert len(whole["input_ids"]) > limit
    parts, dropped = split_conversation(tokenizer, record, "vicuna_v1.1", limit)
    assert dropped == 0 and [p["id"] for p in parts] == ["long_1", "long_5", "long_9"]  # FastChat: <id>_<first turn>
    for part in parts:
        assert len(part["input_ids"]) <= limit
        assert part["labels"][-1] == tokenizer.eos_token_id  # each part ends with a whole answer
    assert sum(1 for p in parts for t in p["labels"] if t == tokenizer.eos_token_id) == 6


def test_a_pair_too_long_for_the_limit_is_dropped_and_counted(tmp_path, tokenizer):
    records = [{"id": "fits", "conversations": _pairs(1, 3)},
               {"id": "huge", "conversations": _pairs(1, 3) + _pairs(1, 400)}]
    report = tokenize_split(records, tokenizer, "auto", 200, 1, tmp_path / "train")
    assert report["examples"] == 2 and report["dropped_pairs"] == 1 and report["split_conversations"] == 0
    from datasets import load_from_disk

    dataset = load_from_disk(str(tmp_path / "train"))
    assert sorted(dataset["id"][:]) == ["fits", "huge_0"]
    assert max(dataset["length"][:]) <= 200
    assert sum(row["examples"] for row in report["histogram"]) == 2


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_two_processes_give_the_same_examples_as_one(tmp_path, tokenizer):
    from datasets import load_from_disk

    records = load_alpaca(SHARED_DATA / "alpaca_data_2000.json")
    one = tokenize_split(records, tokenizer, "auto", 512, 1, tmp_path / "one")
    two = tokenize_split(records, tokenizer, "auto", 512, 2, tmp_path / "two")
    assert one["num_proc"] == 1 and two["num_proc"] == 2
    assert {k: v for k, v in one.items() if k != "num_proc"} == {k: v for k, v in two.items() if k != "num_proc"}
    a, b = load_from_disk(str(tmp_path / "one")), load_from_disk(str(tmp_path / "two"))
    assert a["id"][:] == b["id"][:] and a["input_ids"][:] == b["input_ids"][:] and a["labels"][:] == b["labels"][:]


def test_tokenize_stage_is_cached_by_data_tokenizer_template_and_length(tmp_path):
    from labtune.stages.data import build_data
    from labtune.stages.tokenize import build_tokenize
    from labtune.stages.weights import build_weights

    store = LocalStore(tmp_path / "store")
    recipe = load_recipe(TINY_RECIPE, [f"store.uri={store.root}"])
    model, data = build_weights(recipe, store).uri, build_data(recipe, store).uri
    first = build_tokenize(recipe, store, model, data)
    report = json.loads((fetch(store, first.uri) / "report.json").read_text())
    assert report["train"]["examples"] > 0 and report["train"]["template"] == "vicuna_v1.1"
    assert build_tokenize(load_recipe(TINY_RECIPE, [f"store.uri={store.root}", "train.learning_rate=0.1"]),
                          store, model, data).cached
    shorter = build_tokenize(load_recipe(TINY_RECIPE, [f"store.uri={store.root}", "train.model_max_length=200"]),
                             store, model, data)
    assert not shorter.cached and shorter.uri != first.uri
    assert json.loads((fetch(store, shorter.uri) / "report.json").read_text())["train"]["max_length"] <= 200


def test_tokenize_command_on_a_sharegpt_file(tmp_path, tiny_model):
    data = tmp_path / "conversations.json"
    data.write_text(json.dumps([{"id": "a", "conversations": _pairs(2, 2)}]))
    out = tmp_path / "tokens"
    result = run_cli("tokenize-files", "--data", str(data), "--model", str(tiny_model), "--out", str(out), "--max-length", "128")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["conversations"] == 1 and report["train"]["examples"] >= 1
    assert (out / "train" / "dataset_info.json").is_file() and (out / "manifest.json").is_file()
