"""Stage 6, evaluate: does the fine-tuned model know the lab's facts, and did it forget the rest?

The base (target) model and the fine-tuned model answer the same prompts: the recipe's
questions, its prompt files and the held-out lab-note questions. Greedy, batched, left-padded
generation with the training chat template. Each answer is scored (expected substring(s) or
regex); accuracy overall and per tag. Both models' loss and perplexity on the tokenized eval
split. Retention: both answer general questions, and the fine-tuned model's perplexity on the
base model's answers, against the base model's own, says how far it drifted.
Output: answers.jsonl, retention.jsonl, summary.json, run.json (the recipe) in the store.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labtune.data.augment import people
from labtune.evaluation import generation
from labtune.evaluation.prompts import Prompt, accuracy, load_prompts, paired, score
from labtune.plots import accuracy_chart, png_markdown
from labtune.recipe import EvalConfig, Recipe
from labtune.store.backends import Store
from labtune.store.hashing import source_sha256
from labtune.store.outputs import (
    MANIFEST,
    Log,
    ManifestError,
    StageResult,
    code_version,
    default_log,
    fetch,
    run_stage,
    stage_key,
)
from labtune.training.trackers import log_evaluation


def collect_prompts(recipe: Recipe, store: Store, data_uri: str | None) -> list[Prompt]:
    """The recipe's questions, its prompt files, then the held-out lab-note questions."""
    prompts = [p.model_copy(update={"tags": p.tags or ["recipe"]}) for p in recipe.evaluation.questions]
    for path in recipe.evaluation.prompt_files:
        prompts += load_prompts(path, default_tag=Path(path).stem)
    if recipe.evaluation.heldout_notes and data_uri:
        held_out = fetch(store, data_uri) / "eval_prompts.json"
        if held_out.is_file():
            prompts += [Prompt(**entry) for entry in json.loads(held_out.read_text())]
    notes = fetch(store, data_uri) / "notes.json" if data_uri else None
    if notes is not None and notes.is_file():
        everyone = people([d.get("fields", {}) for d in json.loads(notes.read_text())])
        prompts = [names_scored(p, everyone) for p in prompts]
    return prompts


def names_scored(prompt: Prompt, everyone: list[str]) -> Prompt:
    """A question whose expected answer is a person from the notes: naming anyone else from the
    notes makes the answer wrong (the names scorer)."""
    options = [prompt.expected] if isinstance(prompt.expected, str) else (prompt.expected or [])
    known = {name.lower() for name in everyone}
    if prompt.forbidden or not options or not all(o.strip().lower() in known for o in options):
        return prompt
    wanted = {o.strip().lower() for o in options}
    return prompt.model_copy(update={"forbidden": [n for n in everyone if n.lower() not in wanted]})


def retention_prompts(recipe: Recipe) -> list[Prompt]:
    if not recipe.evaluation.retention_questions:
        return []
    return load_prompts(recipe.evaluation.retention_questions)[: recipe.evaluation.retention_limit]


def _eval_examples(store: Store, tokens_uri: str | None) -> list[dict[str, list[int]]]:
    if not tokens_uri:
        return []
    tokens_dir = fetch(store, tokens_uri)
    folder = tokens_dir / "eval"
    report = json.loads((tokens_dir / "report.json").read_text())
    if not folder.is_dir() or not report.get("eval", {}).get("examples"):
        return []
    from datasets import load_from_disk

    dataset = load_from_disk(str(folder))
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset] if len(dataset) else []


def training_longest_answer(tokens_dir: Path) -> int | None:
    """The longest assistant turn of a tokenize output's train split, in label tokens (None when
    it holds no train split)."""
    folder = tokens_dir / "train"
    if not folder.is_dir():
        return None
    from datasets import load_from_disk

    return generation.longest_answer_tokens(load_from_disk(str(folder))["labels"]) or None


def answer_budget(setting: int | str, store: Store, tokens_uri: str | None, log: Log = default_log) -> int:
    """`evaluation.max_new_tokens` as a number: a number as it is; auto from the training data's
    longest answer (generation.auto_max_new_tokens)."""
    if setting != "auto":
        return int(setting)
    longest = training_longest_answer(fetch(store, tokens_uri)) if tokens_uri else None
    budget = generation.auto_max_new_tokens(longest)
    log(f"evaluate: max_new_tokens auto -> {budget}" + (f" (the longest training answer is {longest} tokens, plus "
        f"{budget - longest})" if longest else " (no training data known)"))
    return budget


def truncation_warning(truncated: dict[str, list[bool]], budget: int) -> str | None:
    """One line naming, per column, how many answers hit the token limit; None when none did."""
    labels = dict(COLUMNS)
    parts = [f"{sum(flags)} of {len(flags)} {labels.get(column, column)} answers" for column, flags in truncated.items()
             if any(flags)]
    if not parts:
        return None
    return (f"evaluate: {', '.join(parts)} hit max_new_tokens={budget}; raise evaluation.max_new_tokens or leave it "
            "auto")


def evaluate_key(recipe: Recipe, base_uri: str, model_uri: str, data_uri: str | None,
                 tokens_uri: str | None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The evaluate stage's key, inputs and parameters (prompt files by their sha256)."""
    cfg = recipe.evaluation
    parameters = {**cfg.model_dump(mode="json"), "chat_template": recipe.data.chat_template,
                  "system_prompt": recipe.data.system_prompt, "bf16": recipe.train.bf16}
    files = {p: source_sha256(p) for p in cfg.prompt_files + ([cfg.retention_questions] if cfg.retention_questions else [])
             if Path(p).is_file()}
    code = code_version(__name__, "labtune.data.chat", "labtune.evaluation.prompts", "labtune.evaluation.generation",
                        "labtune.evaluation.retrieval")
    inputs = {"base": base_uri, "model": model_uri, "data": data_uri, "tokens": tokens_uri, "prompt_files": files}
    return stage_key("evaluate", code, inputs, parameters), inputs, parameters


COLUMNS = (("base", "base"), ("base_notes", "base + notes"), ("tuned", "fine-tuned"), ("tuned_notes", "fine-tuned + notes"))


def columns_of(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The (column, label) pairs an evaluation summary holds, in table order (a summary written
    before the retrieval columns holds base and fine-tuned only)."""
    return [(c, label) for c, label in COLUMNS if c in summary.get("columns", ["base", "tuned"])]


def notes_index(store: Store, data_uri: str | None) -> Any:
    """The BM25 index of the data stage's notes.json (None when there are no notes)."""
    from labtune.evaluation.retrieval import NotesIndex

    path = fetch(store, data_uri) / "notes.json" if data_uri else None
    documents = json.loads(path.read_text()) if path is not None and path.is_file() else []
    return NotesIndex(documents) if documents else None


@dataclass
class Answers:
    """What both models answered: per column (base, base_notes, tuned, tuned_notes) the answers and
    which were cut at the token limit; the general questions' answers; eval loss and drift."""

    answers: dict[str, list[str]] = field(default_factory=dict)
    truncated: dict[str, list[bool]] = field(default_factory=dict)
    general: dict[str, list[str]] = field(default_factory=dict)
    losses: dict[str, Any] = field(default_factory=dict)
    drift: dict[str, Any] = field(default_factory=dict)


def ask_models(recipe: Recipe, store: Store, models: dict[str, str], questions: list[str], with_notes: list[str],
               general: list[Prompt], eval_examples: list[dict[str, list[int]]], budget: int, log: Log,
               answered: Callable[[int], None]) -> Answers:
    """Each model in turn (base, then tuned; one in memory at a time) answers the questions, with
    the notes retrieved when there are any, and the general questions; eval loss and drift."""
    cfg, template, system = recipe.evaluation, recipe.data.chat_template, recipe.data.system_prompt
    got = Answers()
    for name, uri in models.items():
        model, tokenizer = generation.load_model(fetch(store, uri, log), bf16=recipe.train.bf16)
        log(f"evaluate: {len(questions)} prompts{' (and again with the notes retrieved)' if with_notes else ''} and "
            f"{len(general)} general questions to the {name} model {uri}")
        for column, asked in ((name, questions), (f"{name}_notes", with_notes)):
            if column == name or asked:
                generated = generation.ask(model, tokenizer, asked, budget, cfg.batch_size, template, system, answered)
                got.answers[column], got.truncated[column] = generated.answers, generated.truncated
        if eval_examples:
            got.losses[name] = generation.mean_loss(model, eval_examples, cfg.batch_size)
        if general:
            asked = [p.question for p in general]
            got.general[name] = generation.ask(model, tokenizer, asked, budget, cfg.batch_size, template, system,
                                               answered).answers
            # both models scored on the base model's answers: how far the fine-tuned one moved
            on_base = generation.answer_examples(tokenizer, asked, got.general["base"], template)
            got.drift[name] = generation.mean_loss(model, on_base, cfg.batch_size)
        del model
        gc.collect()
    return got


def scored_rows(prompts: list[Prompt], got: Answers) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns answered and one row per prompt: the prompt, each column's answer, whether it is
    right (pairs scored together) and whether it was cut."""
    columns = [c for c, _ in COLUMNS if c in got.answers]
    correct = {column: paired([score(a, p) for a, p in zip(got.answers[column], prompts)], prompts) for column in columns}
    rows = []
    for i, prompt in enumerate(prompts):
        row = {"question": prompt.question, "expected": prompt.expected, "expected_all": prompt.expected_all,
               "forbidden": prompt.forbidden, "regex": prompt.regex, "tags": prompt.tags,
               **({"pair": prompt.pair} if prompt.pair else {})}
        for column in columns:
            row[f"{column}_answer"] = got.answers[column][i]
            row[f"{column}_correct"] = correct[column][i]
            row[f"{column}_truncated"] = got.truncated[column][i]
        rows.append(row)
    return columns, rows


def summarize(cfg: EvalConfig, columns: list[str], rows: list[dict[str, Any]], retention_rows: list[dict[str, Any]],
              got: Answers, budget: int) -> dict[str, Any]:
    """summary.json: accuracy overall and per tag for each column, answers cut, eval loss, retention."""
    by_column = {column: accuracy(rows, f"{column}_correct") for column in columns}
    summary: dict[str, Any] = {
        "questions": len(rows),
        "total": by_column["base"]["overall"]["total"],
        **{f"{column}_correct": by_column[column]["overall"]["correct"] for column in columns},
        "columns": columns,
        "max_new_tokens": budget,
        "max_new_tokens_setting": cfg.max_new_tokens,
        "truncated": {column: sum(got.truncated[column]) for column in columns},
        "accuracy": by_column,
        "eval_loss": got.losses or None,
    }
    if got.drift:
        base_ppl, tuned_ppl = got.drift["base"]["perplexity"], got.drift["tuned"]["perplexity"]
        summary["retention"] = {
            "questions": len(retention_rows), "source": cfg.retention_questions,
            "base_perplexity_on_base_answers": base_ppl, "tuned_perplexity_on_base_answers": tuned_ppl,
            "drift_ratio": round(tuned_ppl / base_ppl, 4) if base_ppl else None,
            "answers_changed": sum(1 for r in retention_rows if r["base_answer"] != r["tuned_answer"]),
        }
    return summary


def build_evaluate(recipe: Recipe, store: Store, base_uri: str, model_uri: str, log: Log = default_log,
                   data_uri: str | None = None, tokens_uri: str | None = None,
                   on_progress: Callable[[dict], None] | None = None) -> StageResult:
    cfg = recipe.evaluation
    key, inputs, parameters = evaluate_key(recipe, base_uri, model_uri, data_uri, tokens_uri)
    prompts = collect_prompts(recipe, store, data_uri)  # a malformed prompt file fails here, before any model loads
    general = retention_prompts(recipe)

    def build(out: Path) -> dict[str, Any]:
        index = notes_index(store, data_uri) if cfg.retrieval else None
        questions = [p.question for p in prompts]
        with_notes = [index.prompt(q, cfg.retrieval_k) for q in questions] if index is not None else []
        budget = answer_budget(cfg.max_new_tokens, store, tokens_uri, log)
        # every answer both models give, for the progress bar: questions, with notes, general questions
        total, done = 2 * (len(questions) + len(with_notes) + len(general)), [0]

        def answered(count: int) -> None:
            done[0] += count
            if on_progress:
                on_progress({"stage": "evaluate", "step": done[0], "total_steps": total})

        got = ask_models(recipe, store, {"base": base_uri, "tuned": model_uri}, questions, with_notes, general,
                         _eval_examples(store, tokens_uri) if cfg.eval_loss else [], budget, log, answered)
        columns, rows = scored_rows(prompts, got)
        retention_rows = [{"question": p.question, "tags": p.tags, "base_answer": got.general["base"][i],
                           "tuned_answer": got.general["tuned"][i]} for i, p in enumerate(general)]
        summary = summarize(cfg, columns, rows, retention_rows, got, budget)
        trained = fetch(store, model_uri) / "train_metrics.json"
        if trained.is_file():  # into the training run's TensorBoard folder and MLflow run (train.report_to)
            log_evaluation(recipe.train.report_to, json.loads(trained.read_text()).get("tracked") or {}, summary)
        warning = truncation_warning({c: got.truncated[c] for c in columns}, budget)
        if warning:
            log(warning)
        (out / "answers.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        (out / "retention.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in retention_rows))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "run.json").write_text(json.dumps({"recipe": recipe.model_dump(mode="json"), "base": base_uri,
                                                  "model": model_uri}, indent=2))
        log("evaluate: " + ", ".join(f"{label} {summary[f'{c}_correct']}/{summary['total']}"
                                     for c, label in COLUMNS if c in columns) + " correct"
            + (f"; eval loss base {got.losses['base']['loss']} -> fine-tuned {got.losses['tuned']['loss']}"
               if got.losses else "")
            + (f"; retention drift x{summary['retention']['drift_ratio']}" if got.drift else ""))
        return {"summary": summary}

    return run_stage(store, "evaluate", key, build, inputs=inputs, parameters=parameters, log=log)


def read_evaluation(store: Store, uri: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, rows) of an evaluate output."""
    run = run_from_folder(fetch(store, uri), uri)
    return run["summary"], run["rows"]


def read_run(store: Store, uri: str) -> dict[str, Any]:
    """An evaluate output as compare wants it: {uri, recipe, rows, summary}."""
    return run_from_folder(fetch(store, uri), uri)


def run_from_folder(directory: Path, uri: str) -> dict[str, Any]:
    """{uri, recipe, rows, summary} of a fetched (verified, local) evaluate output; any other
    stage's output is refused, naming what it holds."""
    if not all((directory / name).is_file() for name in ("answers.jsonl", "run.json", "summary.json")):
        try:
            stage = json.loads((directory / MANIFEST).read_text()).get("stage", "?")
        except (OSError, ValueError):
            stage = "?"
        raise ManifestError(f"{uri}: not an evaluate output (it holds a {stage} output); give the URIs that the "
                            "evaluate stage prints")
    rows = [json.loads(line) for line in (directory / "answers.jsonl").read_text().splitlines() if line.strip()]
    return {"uri": uri, "recipe": json.loads((directory / "run.json").read_text())["recipe"], "rows": rows,
            "summary": json.loads((directory / "summary.json").read_text())}


def summary_markdown(summary: dict[str, Any], uri: str) -> str:
    """Accuracy overall and per tag (the axes recall, paraphrase, reverse, absent among them) for
    each column (base, base + notes, fine-tuned, fine-tuned + notes), then loss and retention."""
    columns = columns_of(summary)
    accuracy = summary["accuracy"]
    lines = ["# Evaluation", "", png_markdown("accuracy by question type", accuracy_chart(summary, columns)), "",
             "| | " + " | ".join(label for _, label in columns) + " |", "|---|" + "---|" * len(columns)]

    def cell(tally: dict[str, Any]) -> str:
        share = f" ({tally['accuracy']:.0%})" if tally.get("accuracy") is not None else ""
        return f"{tally['correct']}/{tally['total']}{share}"

    lines.append("| all scored prompts | " + " | ".join(cell(accuracy[c]["overall"]) for c, _ in columns) + " |")
    for tag in accuracy["tuned"]["by_tag"]:
        lines.append(f"| tag `{tag}` | " + " | ".join(cell(accuracy[c]["by_tag"][tag]) for c, _ in columns) + " |")
    if "truncated" in summary:
        lines.append(f"| answers cut at max_new_tokens={summary['max_new_tokens']} | "
                     + " | ".join(f"{summary['truncated'].get(c, 0)}/{summary['questions']}" for c, _ in columns) + " |")
    blank = " |" * (len(columns) - 2)
    if summary.get("eval_loss"):
        loss = summary["eval_loss"]
        lines.append(f"| eval-split loss (perplexity), base and fine-tuned | {loss['base']['loss']} ({loss['base']['perplexity']}) | "
                     f"{loss['tuned']['loss']} ({loss['tuned']['perplexity']}) |{blank}")
    if summary.get("retention"):
        r = summary["retention"]
        lines.append(f"| retention: perplexity on the base model's answers to {r['questions']} general questions, base and "
                     f"fine-tuned | {r['base_perplexity_on_base_answers']} | {r['tuned_perplexity_on_base_answers']} "
                     f"(drift x{r['drift_ratio']}) |{blank}")
    return "\n".join(lines + ["", f"Output: `{uri}`"])
