"""Evaluation: scoring rules, prompt files and bad entries, batched vs one-by-one generation,
perplexity on a model whose answer is known, held-out note prompts, ask/chat, compare and sweep."""

import json
import math
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA, TINY_RECIPE, run_cli

from labtune.evaluation.comparison import recipe_differences
from labtune.evaluation.generation import mean_loss
from labtune.evaluation.prompts import Prompt, PromptError, accuracy, load_prompts, score


@pytest.mark.parametrize("prompt, answer, expected", [
    (Prompt(question="q", expected="Lena Fischer"), "It was lena fischer.", True),
    (Prompt(question="q", expected="Lena Fischer"), "Sofia Rossi.", False),
    (Prompt(question="q", expected=["Lena", "L. Fischer"]), "Dr. L. Fischer presented", True),
    (Prompt(question="q", expected=["Lena", "L. Fischer"]), "Maya", False),
    (Prompt(question="q", regex=r"\b(4|four) (people|attendees)\b"), "Four people came.", True),
    (Prompt(question="q", regex=r"^\d+$"), "12 people", False),
    (Prompt(question="q", expected="Maya", regex=r"Okafor"), "Okafor", True),  # either rule
    (Prompt(question="q"), "anything", None),  # unscored
])
def test_scoring_rules(prompt, answer, expected):
    assert score(answer, prompt) is expected


def test_accuracy_overall_and_per_tag():
    rows = [{"tags": ["presenter"], "c": True}, {"tags": ["presenter"], "c": False}, {"tags": ["topic"], "c": True},
            {"tags": ["topic"], "c": None}]
    result = accuracy(rows, "c")
    assert result["overall"] == {"correct": 2, "total": 3, "accuracy": round(2 / 3, 4)}
    assert result["by_tag"]["presenter"]["accuracy"] == 0.5 and result["by_tag"]["topic"]["total"] == 1


def test_prompt_file_yaml_json_and_vicuna_bench(tmp_path):
    yaml_file = tmp_path / "prompts.yaml"
    yaml_file.write_text("prompts:\n  - {question: 'Who presented on 4/14/2023?', expected: [Lena, Fischer], tags: [presenter]}\n"
                         "  - question: How many came?\n    regex: '\\d+'\n")
    prompts = load_prompts(yaml_file, default_tag="lab")
    assert [p.expected for p in prompts] == [["Lena", "Fischer"], None]
    assert prompts[0].tags == ["presenter", "lab"] and prompts[1].regex == r"\d+"
    json_file = tmp_path / "prompts.json"
    json_file.write_text(json.dumps([{"question": "Q?", "expected": "A"}]))
    assert load_prompts(json_file)[0].expected == "A"
    bench = SHARED_DATA / "fastchat_vicuna_bench_question.jsonl"
    if bench.is_file():
        vicuna = load_prompts(bench)
        assert len(vicuna) == 80 and vicuna[0].tags and not vicuna[0].scored


@pytest.mark.parametrize("entry, message", [
    ("{expected: Lena}", r"entry 1: question: Field required"),
    ("{question: Q, expected: []}", r"entry 1: expected: a list of expected answers must hold non-empty strings"),
    ("{question: Q, regex: '(unclosed'}", r"entry 1: regex: regex does not compile"),
    ("{question: Q, answer: A}", r"entry 1: answer: unknown key"),
    ("just a string", r"entry 1: expected a mapping with `question`, got str"),
])
def test_a_malformed_prompt_entry_fails_naming_the_file_and_entry(tmp_path, entry, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"- {{question: fine, expected: ok}}\n- {entry}\n")
    with pytest.raises(PromptError, match=f"^{path}: {message}"):
        load_prompts(path)


def test_recipe_differences_name_what_changed():
    a = {"name": "x", "train": {"num_train_epochs": 3, "lr": 1}, "data": {"sources": [{"weight": 1.0}, {"weight": 1.0}]}}
    b = {"name": "y", "train": {"num_train_epochs": 50, "lr": 1}, "data": {"sources": [{"weight": 1.0}, {"weight": 0.0}]}}
    assert recipe_differences([a, b]) == [{"data.sources.1.weight": 1.0, "train.num_train_epochs": 3},
                                          {"data.sources.1.weight": 0.0, "train.num_train_epochs": 50}]


def test_perplexity_of_a_model_with_uniform_predictions_is_the_vocabulary_size(tiny_model):
    import torch

    from labtune.evaluation.generation import load_model

    model, _ = load_model(tiny_model)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # every logit 0: uniform over the vocabulary
    vocab = model.config.vocab_size
    examples = [{"input_ids": [1, 5, 9, 13, 2], "labels": [-100, -100, 9, 13, 2]},
                {"input_ids": [1, 7, 8], "labels": [-100, 7, 8]}]
    result = mean_loss(model, examples, batch_size=2)
    assert result["tokens"] == 5
    assert result["loss"] == pytest.approx(math.log(vocab), rel=1e-4)
    assert result["perplexity"] == pytest.approx(vocab, rel=1e-3)


def test_perplexity_from_label_positions_in_token_budgeted_batches_is_the_full_forward_s(tiny_model):
    """mean_loss runs the output layer on label positions only, in batches of at most max_tokens
    padded tokens: the same mean loss as transformers' own loss over each example in full."""
    import torch

    from labtune.evaluation.generation import load_model

    model, _ = load_model(tiny_model)
    generator = torch.Generator().manual_seed(3)
    examples = []
    for n in (5, 9, 14, 30, 31):
        ids = torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:  # one at a time, every position's logits, transformers' shifted loss
            labels = torch.tensor([e["labels"]])
            tokens = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=torch.tensor([e["input_ids"]]), labels=labels).loss) * tokens
            count += tokens
    result = mean_loss(model, examples, batch_size=4, max_tokens=40)  # several batches, some of one example
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(total / count, rel=1e-4)


def test_batched_and_one_by_one_generation_give_the_same_answers(tiny_model):
    from labtune.evaluation.generation import ask, load_model

    model, tokenizer = load_model(tiny_model)
    questions = ["Who presented at the lab meeting on 4/14/2023?", "Topic?",
                 "What were the action items from the May 12, 2023 lab meeting about the protein assay?",
                 "Who recorded the notes?", "Who attended the lab meeting on 1/13/2023 and what was discussed there?"]
    batched = ask(model, tokenizer, questions, max_new_tokens=12, batch_size=5)
    single = ask(model, tokenizer, questions, max_new_tokens=12, batch_size=1)
    assert batched == single
    # batches of two are formed by prompt length (short with short), and answers still come back in order
    assert ask(model, tokenizer, questions, max_new_tokens=12, batch_size=2) == single
    assert any(answer for answer in batched.answers)


def test_questions_after_the_same_note_share_its_prefill_and_get_the_answers_they_get_alone(tiny_model):
    from labtune.data.chat import conversation_prompt_ids
    from labtune.evaluation.generation import SHARED_PREFIX_MIN, _common_prefix, ask, load_model, prompt_batches

    model, tokenizer = load_model(tiny_model)
    note = ("Lab meeting notes:\n\nLab meeting 4/14/2023. Presenter: Lena Fischer. Recorder: Daniel Brooks. "
            "Topic: zebrafish fin regeneration and the imaging pipeline; action items for the protein assay.\n\n")
    other = "Lab notes, January:\n\n" + note.replace("Lena Fischer", "Maya Okafor").replace("4/14", "1/13")
    questions = [note + "Who presented?", note + "Who recorded the notes of this lab meeting on 4/14/2023?",
                 note + "Topic?", "Who presented at the lab meeting on 5/12/2023?", other + "Who presented?",
                 other + "What were the action items of the lab meeting on 1/13/2023?"]
    rendered = [conversation_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    assert _common_prefix(rendered[0], rendered[2]) >= SHARED_PREFIX_MIN
    # one batch: the two notes' questions in a group each, the lone question on its own (the tiny
    # model's Vicuna system prompt, which all share, is computed once per group)
    assert sorted(sorted(g) for g in prompt_batches(rendered, 8)[0]) == [[0, 1, 2], [3], [4, 5]]
    # a group split across batches of three
    assert [sum(len(g) for g in b) for b in prompt_batches(rendered, 3)] == [3, 3]
    # a shared header over different notes is no group: the rows would carry the unshared notes as padding
    header = "No lab meeting notes are dated 5/9/2023 (May meetings: 12, 26; 9 is not among them). The closest notes:\n\n"
    apart = [conversation_prompt_ids(tokenizer, [{"role": "user", "content": header + text * 3 + "Who?"}])
             for text in (note, other)] + [rendered[3]]
    assert _common_prefix(apart[0], apart[1]) >= _common_prefix(apart[0], apart[2]) + SHARED_PREFIX_MIN
    assert [0, 1] not in [sorted(group) for group in prompt_batches(apart, 8)[0]]
    single = ask(model, tokenizer, questions, max_new_tokens=12, batch_size=1)
    assert ask(model, tokenizer, questions, max_new_tokens=12, batch_size=8) == single
    assert ask(model, tokenizer, questions, max_new_tokens=12, batch_size=3) == single
    assert any(answer for answer in single.answers)


def test_answers_that_end_leave_the_batch_and_the_others_decode_as_transformers_generate_does(tiny_model):
    from labtune.data.chat import conversation_prompt_ids
    from labtune.evaluation.generation import _generate_batch, _padded, load_model

    model, tokenizer = load_model(tiny_model)
    questions = ["Who presented at the lab meeting on 4/14/2023?", "Topic?", "Who recorded the notes on 1/13/2023?",
                 "What were the action items of the lab meeting on 5/12/2023?", "Name a planet.", "Write a haiku.",
                 "Who presented at the lab meeting on 7/7/2023?", "What is a cell?"]
    rendered = [[*conversation_prompt_ids(tokenizer, [{"role": "user", "content": q}])] for q in questions]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    alone = [[r] for r in rendered]
    unstopped = _generate_batch(model, alone, 16, pad, [-1])

    def cut(row: list[int], stops: list[int]) -> list[int]:
        return next((row[: i + 1] for i, t in enumerate(row) if t in stops), row)

    # two stop tokens that end the answers at the most different steps: rows leave one by one
    seen = sorted({t for row in unstopped for t in row})
    stops = max(([a, b] for a in seen for b in seen if a < b),
                key=lambda pair: len({len(cut(row, pair)) for row in unstopped}))
    ours = _generate_batch(model, alone, 16, pad, stops)
    input_ids, attention_mask = _padded(rendered, pad)
    theirs = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=16, do_sample=False,
                            eos_token_id=stops, pad_token_id=pad, use_cache=True)[:, input_ids.shape[1]:].tolist()
    assert len({len(cut(row, stops)) for row in ours}) >= 3
    assert sum(1 for row in ours if len(cut(row, stops)) <= 8) >= 2  # a quarter gone by half-way: the cache is cut down
    assert [cut(row, stops) for row in ours] == [cut(row, stops) for row in theirs]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The tiny pipeline with a held-out split, a prompt file, general questions and reference answers."""
    from labtune.recipe import load_recipe
    from labtune.stages.data import build_data
    from labtune.stages.evaluate import build_evaluate
    from labtune.stages.tokenize import build_tokenize
    from labtune.stages.train import build_train
    from labtune.stages.weights import build_weights
    from labtune.store.backends import LocalStore

    root = tmp_path_factory.mktemp("evaluate")
    prompts = root / "lab.yaml"
    prompts.write_text("- {question: 'Who presented at the lab meeting on 4/14/2023?', expected: [Lena Fischer, Lena], tags: [presenter]}\n")
    general = root / "general.jsonl"
    general.write_text("".join(json.dumps({"question_id": i, "category": "generic", "turns": [q]}) + "\n"
                               for i, q in enumerate(["What is a cell?", "Name a planet.", "Write a haiku."])))
    references = root / "alpaca.json"
    references.write_text(json.dumps([{"instruction": "Name a color.", "input": "", "output": "Blue."},
                                      {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]))
    recipe = load_recipe(TINY_RECIPE, [f"store.uri={root / 'store'}", "data.sources.0.eval_fraction=0.25",
                                       f"evaluation.prompt_files=[{prompts}]", f"evaluation.general.questions={general}",
                                       f"evaluation.general.references={references}"])
    store = LocalStore(root / "store")
    base = build_weights(recipe, store).uri
    data = build_data(recipe, store).uri
    tokens = build_tokenize(recipe, store, base, data).uri
    model = build_train(recipe, store, base, tokens, log=lambda line: None).uri
    result = build_evaluate(recipe, store, base, model, data_uri=data, tokens_uri=tokens)
    return recipe, store, {"target": base, "data": data, "tokens": tokens, "tuned": model, "evaluation": result.uri}


def test_held_out_note_questions_become_prompts_and_never_train(evaluated):
    _, _, uris = evaluated
    data = Path(uris["data"])
    prompts = json.loads((data / "eval_prompts.json").read_text())
    train_questions = {r["conversations"][0]["value"] for r in json.loads((data / "train.json").read_text())}
    eval_questions = {r["conversations"][0]["value"] for r in json.loads((data / "eval.json").read_text())}
    assert prompts and all(p["question"] in eval_questions and p["question"] not in train_questions for p in prompts)
    assert all(p["tags"][0] == "heldout_notes" and p["tags"][1] in ("presenter", "recorder", "topic") for p in prompts)
    assert "fact" not in (data / "train.json").read_text()  # bookkeeping never reaches the tokenizer


def test_evaluate_scores_tags_loss_and_general_ability(evaluated):
    _, _, uris = evaluated
    out = Path(uris["evaluation"])
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert {"recipe", "lab", "heldout_notes", "presenter"} <= set(summary["accuracy"]["tuned"]["by_tag"])
    assert summary["total"] == len(rows) == summary["questions"]
    assert all(r["base_correct"] in (True, False) for r in rows)
    loss = summary["eval_loss"]
    assert loss["base"]["tokens"] == loss["tuned"]["tokens"] > 0
    assert loss["tuned"]["loss"] < loss["base"]["loss"]  # it trained on the notes of this lab
    assert loss["base"]["perplexity"] == pytest.approx(math.exp(loss["base"]["loss"]), rel=1e-3)
    general = summary["general"]
    assert general["questions"] == 3 and set(general["hijacked"]) == {"base", "tuned"}
    references = general["references"]
    assert references["count"] == 2 and references["base_perplexity"] > 1
    assert references["ratio"] == pytest.approx(references["tuned_perplexity"] / references["base_perplexity"], rel=1e-3)
    rows = [json.loads(line) for line in (out / "general.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == ["What is a cell?", "Name a planet.", "Write a haiku."]
    assert all("base_hijacked" in r and "tuned_answer" in r for r in rows)


def test_ask_and_chat_on_a_model_in_the_store_and_refuse_an_incomplete_one(evaluated, tmp_path):
    _, _, uris = evaluated
    proc = run_cli("ask", uris["tuned"], "Who presented at the lab meeting on 4/14/2023?", "Topic?", "--json",
                   "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [a["question"] for a in answers] == ["Who presented at the lab meeting on 4/14/2023?", "Topic?"]
    # without a limit: the train stage's own data sets it, as in evaluation; the tiny model never
    # ends its turn, so the answer is cut there, and said so
    from labtune.evaluation.generation import auto_max_new_tokens
    from labtune.stages.evaluate import training_longest_answer

    budget = auto_max_new_tokens(training_longest_answer(Path(uris["tokens"])))
    proc = run_cli("ask", uris["tuned"], "Who presented at the lab meeting on 4/14/2023?")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"hit --max-new-tokens={budget}; raise it" in proc.stderr
    proc = run_cli("ask", uris["tuned"], "Hello?", "--max-new-tokens", "0")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        "labtune: error: --max-new-tokens: must be auto or a whole number of at least 1 (got '0')"
    chat = run_cli("chat", uris["tuned"], "--max-new-tokens", "6", stdin="Hello\nWho presented?\n/exit\n")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert len(chat.stdout.splitlines()) == 2  # one answer per turn
    # with --notes: each question's notes in the system turn, the note of the date it names first, said on stderr
    notes = REPO / "examples" / "labnotes"
    chat = run_cli("chat", uris["tuned"], "--max-new-tokens", "4", "--notes", str(notes),
                   stdin="Who presented on April 14th 2023?\nAnd on 2023-05-12?\n/exit\n")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert len(chat.stdout.splitlines()) == 2
    assert [line for line in chat.stderr.splitlines() if line.startswith("notes: ")] == \
        ["notes: 2023-04-14.md", "notes: 2023-05-12.md"]
    proc = run_cli("ask", uris["tuned"], "Who presented on 4/14/2023?", "--notes", str(notes), "--top-k", "2", "--json",
                   "--max-new-tokens", "4")
    assert proc.returncode == 0 and json.loads(proc.stdout)["notes"][0] == "2023-04-14.md"
    empty = tmp_path / "no-notes"
    empty.mkdir()
    for command in (["ask", uris["tuned"], "Who?"], ["chat", uris["tuned"]]):
        proc = run_cli(*command, "--notes", str(empty), stdin="/exit\n")
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"labtune: error: {empty}: no ")

    import shutil

    broken = tmp_path / "store" / "train" / "abc"
    shutil.copytree(uris["tuned"], broken)
    (broken / "manifest.json").unlink()
    proc = run_cli("ask", str(broken), "Hello?")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"labtune: error: {broken}: no complete output here (manifest.json missing)"


def _label_runs(labels: list[int]) -> list[int]:
    import itertools

    return [len(list(group)) for labelled, group in itertools.groupby(labels, key=lambda t: t != -100) if labelled]


def test_auto_answer_budget_is_the_longest_training_answer_plus_the_margin(evaluated):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from labtune.evaluation.generation import auto_max_new_tokens
    from labtune.stages.evaluate import training_longest_answer

    recipe, _, uris = evaluated
    train = load_from_disk(str(Path(uris["tokens"]) / "train"))
    longest = max(max(_label_runs(row), default=0) for row in train["labels"])
    assert training_longest_answer(Path(uris["tokens"])) == longest
    # every short answer's own tokens fit in its labelled span (the span adds the end-of-turn token;
    # whole notes longer than model_max_length are cut by the tokenize stage, and so is their span)
    tokenizer = AutoTokenizer.from_pretrained(uris["tuned"])
    lengths = [len(tokenizer(t["value"], add_special_tokens=False)["input_ids"])
               for r in json.loads((Path(uris["data"]) / "train.json").read_text())
               for t in r["conversations"] if t["from"] == "gpt"]
    assert max(n for n in lengths if n < recipe.data.model_max_length // 2) < longest
    assert auto_max_new_tokens(longest) == longest + max(16, math.ceil(longest / 4))
    assert auto_max_new_tokens(None) == 128 and auto_max_new_tokens(10) == 26 and auto_max_new_tokens(200) == 250


def test_answers_cut_at_the_token_limit_are_counted_and_warned_about(evaluated):
    from labtune.stages.evaluate import build_evaluate

    recipe, store, uris = evaluated
    # the tiny random model never says its end-of-turn token: at 8 tokens every answer is cut
    summary = json.loads((Path(uris["evaluation"]) / "summary.json").read_text())
    rows = [json.loads(line) for line in (Path(uris["evaluation"]) / "answers.jsonl").read_text().splitlines()]
    assert summary["max_new_tokens"] == 8 and summary["max_new_tokens_setting"] == 8
    assert summary["truncated"]["tuned"] == sum(r["tuned_truncated"] for r in rows) == len(rows)
    auto = recipe.model_copy(deep=True)
    auto.evaluation.max_new_tokens = "auto"
    auto.evaluation.general.questions = None
    lines: list[str] = []
    result = build_evaluate(auto, store, uris["target"], uris["tuned"], log=lines.append, data_uri=uris["data"],
                            tokens_uri=uris["tokens"])
    summary = json.loads((Path(result.uri) / "summary.json").read_text())
    from labtune.stages.evaluate import training_longest_answer

    longest = training_longest_answer(Path(uris["tokens"]))
    assert summary["max_new_tokens"] == longest + max(16, math.ceil(longest / 4))
    assert f"evaluate: max_new_tokens auto -> {summary['max_new_tokens']} (the longest training answer is {longest} tokens" \
        in "\n".join(lines)
    n = summary["questions"]
    warning = [line for line in lines if "hit max_new_tokens" in line]
    assert warning == [f"evaluate: {summary['truncated']['base']} of {n} base answers, {summary['truncated']['tuned']} of {n} "
                       f"fine-tuned answers hit max_new_tokens={summary['max_new_tokens']}; raise "
                       "evaluation.max_new_tokens or leave it auto"]


def test_an_answer_that_ends_its_turn_is_not_counted_as_cut(tiny_model):
    import torch

    from labtune.data.chat import stop_token_ids
    from labtune.evaluation.generation import ask, load_model

    model, tokenizer = load_model(tiny_model)
    quiet = ask(model, tokenizer, ["Who presented?", "Topic?"], max_new_tokens=6, batch_size=2)
    assert quiet.truncated == [True, True] and quiet.tokens == 12
    # the same model made to say its end-of-turn token at once: nothing is cut
    stop = stop_token_ids(tokenizer)[0]
    bias = torch.zeros(model.lm_head.out_features)
    bias[stop] = 100.0
    model.lm_head.bias = torch.nn.Parameter(bias)
    stopped = ask(model, tokenizer, ["Who presented?", "Topic?"], max_new_tokens=6, batch_size=2)
    assert stopped.truncated == [False, False] and stopped.tokens == 2 and stopped.answers == ["", ""]


def test_weekly_meetings_recite_within_the_auto_limit_where_48_tokens_cut_them(tmp_path):
    """Four or five meetings a month: every recited training answer fits the auto budget."""
    import datetime as dt

    from transformers import AutoTokenizer

    from labtune.evaluation.generation import auto_max_new_tokens
    from labtune.recipe import load_recipe
    from labtune.stages.data import build_data
    from labtune.stages.evaluate import training_longest_answer
    from labtune.stages.tokenize import build_tokenize
    from labtune.stages.weights import build_weights
    from labtune.store.backends import LocalStore

    notes = tmp_path / "weekly"
    notes.mkdir()
    for week in range(10):
        day = dt.date(2023, 1, 6) + dt.timedelta(weeks=week)
        (notes / f"{day.isoformat()}.md").write_text(
            f"# Lab meeting {day.isoformat()}\n\nPresenter: Person Number{week}\nRecorder: Scribe Number{week}\n"
            f"Topic: weekly topic {week}\n")
    recipe = load_recipe(TINY_RECIPE, [f"store.uri={tmp_path / 'store'}", f"data.sources.0.path={notes}",
                                       "data.augment.enabled=true", "data.augment.recite_month=true"])
    store = LocalStore(tmp_path / "store")
    base = build_weights(recipe, store).uri
    data = build_data(recipe, store).uri
    tokens = build_tokenize(recipe, store, base, data).uri
    budget = auto_max_new_tokens(training_longest_answer(Path(tokens)))
    tokenizer = AutoTokenizer.from_pretrained(base)
    recited = [t["value"] for r in json.loads((Path(data) / "train.json").read_text()) for t in r["conversations"]
               if t["from"] == "gpt" and "meetings: " in t["value"]]
    assert any("January meetings: 6, 13, 20, 27;" in a for a in recited)
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in recited]
    assert max(lengths) <= budget
    assert max(lengths) > 48  # the old fixed limit would have cut them in this tokenizer


def test_a_recipe_with_a_malformed_prompt_file_fails_before_any_model_loads(evaluated, tmp_path):
    recipe, store, uris = evaluated
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {question: ok}\n- {expected: no question}\n")
    broken = recipe.model_copy(deep=True)
    broken.evaluation.prompt_files = [str(bad)]
    from labtune.stages.evaluate import build_evaluate

    with pytest.raises(PromptError, match=f"{bad}: entry 1: question: Field required"):
        build_evaluate(broken, store, uris["target"], uris["tuned"], data_uri=uris["data"], tokens_uri=uris["tokens"])


@pytest.mark.slow
def test_sweep_runs_every_variant_and_compare_puts_them_side_by_side(prefect_api, tmp_path):
    store = tmp_path / "store"
    proc = run_cli("sweep", str(TINY_RECIPE), f"store.uri={store}", "--grid", "train.num_train_epochs=1,2", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["columns"] == ["train.num_train_epochs=1.0", "train.num_train_epochs=2.0"]
    assert [r["variant"] for r in result["runs"]] == [{"train.num_train_epochs": "1"}, {"train.num_train_epochs": "2"}]
    assert len(list((store / "weights").glob("*/manifest.json"))) == 1  # shared stages ran once
    assert len(list((store / "train").glob("*/manifest.json"))) == 2
    rows = result["rows"]
    assert rows and all({"question", "expected", "base", *result["columns"]} <= set(r) for r in rows)

    compare = run_cli("compare", *[r["uri"] for r in result["runs"]])
    assert compare.returncode == 0, compare.stderr[-2000:]
    header = compare.stdout.splitlines()[0]
    assert header == "| question | expected | base | train.num_train_epochs=1.0 | train.num_train_epochs=2.0 |"
    assert rows[0]["question"] in compare.stdout
