"""General ability: answers about the lab's meetings counted as hijacked, the shipped general
prompts, reference answers, self-replay (the base model's own answers joining training), and the
base model's answers kept as an output of their own and reused by a second fine-tune."""

import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA, TINY_RECIPE

from labtune.evaluation.general import (
    BUILTIN_QUESTIONS,
    general_questions,
    lab_markers,
    reference_answers,
    replay_prompts,
)
from labtune.evaluation.prompts import PromptError

NOTES = [{"date": "2023-04-14", "fields": {"presenter": "Lena Fischer", "recorder": "Daniel Brooks",
                                            "topic": "vessel regrowth imaging in kdrl:GFP fish"}},
         {"date": "2023-03-10", "fields": {"presenter": "Sofia Rossi", "topic": "fish facility water quality"}}]


@pytest.mark.parametrize("answer, marker", [
    # what the demo's model answered before self-replay (issue 42)
    ("Fofia is the capital of the 2/24/2023, 4/28/2023, 7/7/2023.", "2/24/2023"),
    ("On 3/10/2023 (March meetings: 10, 24; 10 is among them) the topic was fish facility water quality.", "3/10/2023"),
    ("Japan presented on 3/10/2023, 5/12/2023.", "3/10/2023"),
    ("On 4/10 of the notes in the notes.", "in the notes"),
    ("Lena Fischer would reverse the list.", "Lena Fischer"),
    ("The talk was about vessel regrowth imaging in kdrl:GFP fish.", "vessel regrowth imaging in kdrl:GFP fish"),
    ("It was discussed at the lab meeting.", "lab meeting"),
    ("On April 14, 2023 we met.", "April 14, 2023"),
    # a general answer: not hijacked, though it has dates, numbers and common words
    ("The capital of France is Paris.", None),
    ("Apollo 11 landed on the Moon on July 20, 1969; Neil Armstrong stepped out first.", None),
    ("Use my_list[::-1] or my_list.reverse() to reverse a list in Python.", None),
    ("Waves roll in, 14 gulls cry, the sea remembers every shore.", None),
    ("A good meeting has an agenda, a note taker and clear action items.", None),
])
def test_an_answer_that_talks_about_the_lab_meetings_is_hijacked(answer, marker):
    found = lab_markers(NOTES).found(answer)
    assert (found.lower() if found else None) == (marker.lower() if marker else None)


def test_the_shipped_general_questions_and_replay_prompts_never_overlap():
    questions = general_questions("builtin", None)
    assert len(questions) == 80 and all("general" in p.tags for p in questions)
    assert "FastChat" in (BUILTIN_QUESTIONS.parent / "NOTICE.md").read_text()  # Apache-2.0 attribution
    replay = replay_prompts("builtin")
    assert len(replay) == 169 and len(set(replay)) == 169
    assert not {p.question.strip().lower() for p in questions} & {p.strip().lower() for p in replay}
    assert general_questions(None, 80) == []


def test_reference_answers_from_alpaca_and_sharegpt_and_one_line_errors(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add these.", "input": "2, 3", "output": "5"},
                                  {"instruction": "Name a color.", "input": "", "output": "Blue."}]))
    assert reference_answers(str(alpaca), 10) == [("Add these.\n2, 3", "5"), ("Name a color.", "Blue.")]
    assert len(reference_answers(str(alpaca), 1)) == 1
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "Hi?"},
                                                                   {"from": "gpt", "value": "Hello."}]}]))
    assert reference_answers(str(sharegpt), 10) == [("Hi?", "Hello.")]
    shared = SHARED_DATA / "alpaca_data_2000.json"
    if shared.is_file():
        assert len(reference_answers(str(shared), 100)) == 100
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(PromptError, match=r"bad.json: record 0 is neither Alpaca"):
        reference_answers(str(bad), 10)
    with pytest.raises(PromptError, match=r"missing.json: reference answers file not found"):
        reference_answers(str(tmp_path / "missing.json"), 10)


def test_whole_sentences_of_a_cut_answer():
    from labtune.stages.replay import whole_sentences

    assert whole_sentences("Paris is the capital. It has the Louvre and") == "Paris is the capital."
    assert whole_sentences("Steps:\n1. Boil water\n2. Add") == "Steps:\n1. Boil water"
    assert whole_sentences("no sentence end at all") == ""


def one_fact_recipe(root: Path, epochs: int, lr: float, *overrides: str):
    """The tiny recipe trained to answer every question with one lab fact (and the notes read, so
    the evaluation knows the lab's people and dates)."""
    from labtune.recipe import load_recipe

    questions = [f"{w} {t}?" for w in ("What is", "Tell me about", "Explain", "Describe") for t in
                 ("the sea", "Python", "Paris", "a poem", "the moon", "music", "bread", "trains")]
    data = root / "one_fact.json"
    data.write_text(json.dumps([{"id": f"q{i}", "conversations": [{"from": "human", "value": q}, {
        "from": "gpt", "value": "Lena Fischer."}]} for i, q in enumerate(questions)]))
    sources = (f"[{{type: lab_notes, path: '{TINY_RECIPE.parent / 'labnotes'}', weight: 0.0, eval_fraction: 0.0}}, "
               f"{{type: sharegpt, path: '{data}'}}]")
    return load_recipe(TINY_RECIPE, [f"store.uri={root / 'store'}", f"data.sources={sources}", f"train.num_train_epochs={epochs}",
                                     f"train.learning_rate={lr}", "train.warmup_ratio=0.0",
                                     "train.gradient_accumulation_steps=1", "parallel.nproc_per_node=1",
                                     "evaluation.general.max_new_tokens=12", "evaluation.general.limit=6", *overrides])


@pytest.fixture(scope="module")
def one_fact(tmp_path_factory):
    """A tiny model fine-tuned to answer everything with "Lena Fischer.", evaluated: (root, store,
    evaluate result, its log lines)."""
    from labtune.stages import run_until
    from labtune.store.backends import LocalStore

    root = tmp_path_factory.mktemp("general")
    store = LocalStore(root / "store")
    lines: list[str] = []
    return root, store, run_until("evaluate", one_fact_recipe(root, 40, 3e-3), store, log=lines.append), lines


def test_hijacked_counts_a_model_that_answers_everything_with_a_fact_and_not_its_base(one_fact):
    _, _, evaluated, lines = one_fact
    summary = json.loads((Path(evaluated.uri) / "summary.json").read_text())["general"]
    rows = [json.loads(line) for line in (Path(evaluated.uri) / "general.jsonl").read_text().splitlines()]
    assert summary["questions"] == 6
    assert summary["hijacked"]["base"] == 0 and not any(r["base_hijacked"] for r in rows)
    assert summary["hijacked"]["tuned"] == 6, [r["tuned_answer"] for r in rows]
    assert all(r["tuned_hijacked"] in ("Lena Fischer", "Fischer") for r in rows)
    assert any("WARNING the fine-tuned model answered 6 of 6 general questions" in line for line in lines)
    assert any(line.startswith("baseline: done") for line in lines)


def test_a_second_fine_tune_of_the_same_base_reads_the_base_answers_from_the_store(one_fact):
    from labtune.stages import run_until

    root, store, first, _ = one_fact
    again: list[str] = []
    second = run_until("evaluate", one_fact_recipe(root, 20, 3e-3), store, log=again.append)
    assert second.uri != first.uri
    assert any(line.startswith("baseline: cached at") for line in again)
    assert not any("to the base model" in line for line in again)  # only the fine-tuned model answered
    rows = {uri: [json.loads(line) for line in (Path(uri) / "general.jsonl").read_text().splitlines()]
            for uri in (first.uri, second.uri)}
    assert [r["base_answer"] for r in rows[second.uri]] == [r["base_answer"] for r in rows[first.uri]]


def test_replay_is_what_the_base_model_generated_and_joins_the_train_split(one_fact):
    """Self-replay on a model that says whole sentences (the one-fact model as the base): each
    replay answer (temperature 0) is transformers' own greedy answer, and the conversations join
    the train split."""
    import torch
    from datasets import load_from_disk

    from labtune.data.chat import conversation_prompt_ids, stop_token_ids
    from labtune.evaluation.generation import load_model
    from labtune.stages import run_until
    from labtune.stages.replay import chosen_prompts, whole_sentences

    root, store, evaluated, _ = one_fact
    trained = json.loads((Path(evaluated.uri) / "run.json").read_text())["tuned"]
    prompts = root / "replay.txt"
    prompts.write_text("# general prompts\nName a planet.\n\nWrite a haiku about rain.\nWhat is 2 + 2?\nSay hello.\n")
    recipe = one_fact_recipe(root, 1, 1e-3, f"base_model.source={trained}", "data.replay.enabled=true",
                             f"data.replay.prompts={prompts}", "data.replay.count=3", "data.replay.max_new_tokens=24",
                             "data.replay.temperature=0")
    tokens = run_until("tokenize", recipe, store)
    replay_uri = json.loads((Path(tokens.uri) / "manifest.json").read_text())["inputs"]["replay"]
    records = json.loads((Path(replay_uri) / "replay.json").read_text())
    asked = chosen_prompts(recipe)
    assert len(asked) == 3 and set(asked) < {"Name a planet.", "Write a haiku about rain.", "What is 2 + 2?", "Say hello."}
    model, tokenizer = load_model(Path(trained))
    stops = stop_token_ids(tokenizer)
    expected = {}
    for prompt in asked:  # transformers' own greedy generate
        ids = conversation_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)[0, len(ids):].tolist()
        text = tokenizer.decode(out, skip_special_tokens=True).strip()
        expected[prompt] = text if any(t in stops for t in out) else whole_sentences(text)
    assert len(records) == sum(1 for answer in expected.values() if answer) >= 1
    for record in records:
        question, answer = (turn["value"] for turn in record["conversations"][-2:])
        assert answer == expected[question] and "Lena Fischer" in answer
    train = load_from_disk(str(Path(tokens.uri) / "train"))
    assert sum(1 for i in train["id"] if i.startswith("replay_")) == len(records)
    assert json.loads((Path(tokens.uri) / "report.json").read_text())["train"]["replay"] == len(records)

    # train.replay_distill_top_k: the worker finds those answers among the examples and learns them as
    # the base model's distributions (the loss itself: tests/test_loss.py)
    lines: list[str] = []
    run_until("train", recipe.model_copy(update={"train": recipe.train.model_copy(update={"replay_distill_top_k": 8})}),
              store, log=lines.append)
    assert any(line.startswith(f"replay: {len(records)} answers (") and "over its 8 likeliest tokens" in line
               for line in lines), [line for line in lines if "replay" in line]


def test_sampled_answers_are_drawn_from_the_model_and_repeat_with_their_seed(one_fact):
    """data.replay.temperature: answers drawn from the model's distribution, the same for the same
    seed; at a temperature near 0 the draw is the greedy answer."""
    from labtune.evaluation.generation import Sampling, ask, load_model

    root, store, evaluated, _ = one_fact
    base = json.loads((Path(evaluated.uri) / "run.json").read_text())["target"]
    model, tokenizer = load_model(Path(base))  # the random tiny base: a broad distribution
    questions = ["Name a planet.", "Say hello.", "What is 2 + 2?"]
    draw = lambda seed, t=1.0: ask(model, tokenizer, questions, 12, 3, sampling=Sampling(t, seed)).answers  # noqa: E731
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert draw(7, 1e-4) == ask(model, tokenizer, questions, 12, 3).answers


def test_ask_and_chat_use_the_system_prompt_training_used_unless_told(one_fact, tmp_path):
    """A train stage's output carries its card, and the card the system turn training used: `ask`
    and `chat` ask with it by default (the demo trains with ""), --system-prompt overrides it."""
    from labtune.cli.models import trained_system_prompt
    from labtune.stages import run_until

    root, store, _, _ = one_fact
    trained = run_until("train", one_fact_recipe(root, 20, 3e-3, "data.system_prompt=You answer for the lab."), store)
    assert trained_system_prompt(Path(trained.uri), None) == "You answer for the lab."
    assert trained_system_prompt(Path(trained.uri), "Other.") == "Other."
    empty = tmp_path / "model"
    empty.mkdir()
    (empty / "README.md").write_text('---\nlabtune: {name: x, system_prompt: "", chat_template: auto}\n---\n# x\n')
    assert trained_system_prompt(empty, None) == ""
    (empty / "README.md").write_text("# a model without a header\n")
    assert trained_system_prompt(empty, None) is None  # the chat template's own default


@pytest.mark.parametrize("override, line", [
    ("evaluation.general.questions=/nowhere/general.jsonl", "labtune: error: /nowhere/general.jsonl: prompt file not found"),
    ("data.replay.prompts=/nowhere/replay.txt", "labtune: error: /nowhere/replay.txt: replay prompt file not found"),
])
def test_a_bad_general_or_replay_prompt_file_fails_labtune_run_in_one_line_before_anything_starts(tmp_path, override, line):
    from conftest import run_cli

    proc = run_cli("run", str(TINY_RECIPE), f"store.uri={tmp_path / 'store'}", "data.replay.enabled=true", override,
                   env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})  # nothing listens: it must fail before Prefect
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == line, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not list(tmp_path.rglob("manifest.json"))
