"""Stage 6, evaluate: does the fine-tuned model know the lab's facts, and did it forget the rest?

The base (target) model and the fine-tuned model answer the same prompts: the recipe's
questions, its prompt files and the held-out lab-note questions. Greedy, batched, left-padded
generation with the training chat template. Each answer is scored (expected substring(s) or
regex); accuracy overall and per tag. Both models' loss and perplexity on the tokenized eval
split. General ability (labtune/evaluation/general.py): both answer general questions; answers
that talk about the lab's meetings are counted (`hijacked`), and the fine-tuned model's perplexity
on reference answers, over the base model's, says how far it moved. The base model's answers are
an output of their own (labtune/stages/baseline.py), reused by every fine-tune of the same base.
Output: answers.jsonl, general.jsonl, summary.json, run.json (the recipe) in the store.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labtune.data.note_fields import people
from labtune.evaluation import general, generation
from labtune.evaluation.prompts import Prompt, accuracy, load_prompts, paired, score
from labtune.evaluation.retrieval import recall_line, retrieval_recall
from labtune.plots import accuracy_chart, general_chart, png_markdown
from labtune.recipe import EvalConfig, Recipe
from labtune.stages.baseline import Asked, ask_model, build_baseline
from labtune.store.backends import Store
from labtune.store.hashing import source_sha256
from labtune.store.outputs import (
    MANIFEST,
    Log,
    ManifestError,
    StageKey,
    StageResult,
    code_version,
    default_log,
    fetch,
    run_stage,
    stage_key,
)
from labtune.training.trackers import log_evaluation


def collect_prompts(recipe: Recipe, data_dir: Path | None) -> list[Prompt]:
    """The recipe's questions, its prompt files, then the held-out lab-note questions of the data
    output in `data_dir`."""
    prompts = [p.model_copy(update={"tags": p.tags or ["recipe"]}) for p in recipe.evaluation.questions]
    for path in recipe.evaluation.prompt_files:
        prompts += load_prompts(path, default_tag=Path(path).stem)
    if recipe.evaluation.heldout_notes and data_dir is not None:
        held_out = data_dir / "eval_prompts.json"
        if held_out.is_file():
            prompts += [Prompt(**entry) for entry in json.loads(held_out.read_text())]
    notes = lab_notes(data_dir)
    if notes:
        everyone = people([d.get("fields", {}) for d in notes])
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


def _eval_examples(tokens_dir: Path | None) -> list[dict[str, list[int]]]:
    if tokens_dir is None:
        return []
    folder = tokens_dir / "eval"
    report = json.loads((tokens_dir / "report.json").read_text())
    if not folder.is_dir() or not report.get("eval", {}).get("examples"):
        return []
    from datasets import load_from_disk

    dataset = load_from_disk(str(folder))
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset] if len(dataset) else []


def training_longest_answer(tokens_dir: Path, replay: bool = False) -> int | None:
    """The longest assistant turn of a tokenize output's train split, in label tokens, replay
    conversations left out unless `replay` (None when it holds no train split)."""
    folder = tokens_dir / "train"
    if not folder.is_dir():
        return None
    known = json.loads((tokens_dir / "report.json").read_text()).get("train", {}).get("longest_answer")
    if known is not None and not replay:  # the tokenize stage counted it without the replay conversations
        return known or None
    from datasets import load_from_disk

    return generation.longest_answer_tokens(load_from_disk(str(folder))["labels"]) or None


def answer_budget(setting: int | str, tokens_dir: Path | None, log: Log = default_log) -> int:
    """`evaluation.max_new_tokens` as a number: a number as it is; auto from the training data's
    longest answer (generation.auto_max_new_tokens)."""
    if setting != "auto":
        return int(setting)
    longest = training_longest_answer(tokens_dir) if tokens_dir is not None else None
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


def evaluate_key(recipe: Recipe, store: Store, target_uri: str, tuned_uri: str, data_uri: str | None = None,
                 tokens_uri: str | None = None) -> StageKey:
    """The evaluate stage's key, inputs and parameters (prompt files by their sha256)."""
    cfg = recipe.evaluation
    parameters = {**cfg.model_dump(mode="json"), "chat_template": recipe.data.chat_template,
                  "system_prompt": recipe.data.system_prompt, "bf16": recipe.train.bf16}
    named = [cfg.general.questions, cfg.general.references]
    files = {p: source_sha256(p) for p in cfg.prompt_files + [p for p in named if p and p != "builtin"] if Path(p).is_file()}
    code = code_version(__name__, "labtune.data.chat", "labtune.evaluation.prompts", "labtune.evaluation.generation",
                        "labtune.evaluation.retrieval", "labtune.evaluation.general", "labtune.stages.baseline",
                        "labtune.data.raft")
    inputs = {"target": target_uri, "tuned": tuned_uri, "data": data_uri, "tokens": tokens_uri, "prompt_files": files}
    return StageKey(stage_key("evaluate", code, inputs, parameters), inputs, parameters)


COLUMNS = (("base", "base"), ("base_notes", "base + notes"), ("tuned", "fine-tuned"), ("tuned_notes", "fine-tuned + notes"))


def columns_of(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The (column, label) pairs an evaluation summary holds, in table order (a summary written
    before the retrieval columns holds base and fine-tuned only)."""
    return [(c, label) for c, label in COLUMNS if c in summary.get("columns", ["base", "tuned"])]


def scored_rows(prompts: list[Prompt], answered: dict[str, dict[str, list]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns answered and one row per prompt: the prompt, each column's answer, whether it is
    right (pairs scored together) and whether it was cut."""
    columns = [c for c, _ in COLUMNS if c in answered]
    correct = {c: paired([score(a, p) for a, p in zip(answered[c]["answers"], prompts)], prompts) for c in columns}
    rows = []
    for i, prompt in enumerate(prompts):
        row = {"question": prompt.question, "expected": prompt.expected, "expected_all": prompt.expected_all,
               "forbidden": prompt.forbidden, "regex": prompt.regex, "tags": prompt.tags,
               **({"pair": prompt.pair} if prompt.pair else {})}
        for column in columns:
            row[f"{column}_answer"] = answered[column]["answers"][i]
            row[f"{column}_correct"] = correct[column][i]
            row[f"{column}_truncated"] = answered[column]["truncated"][i]
        rows.append(row)
    return columns, rows


def summarize(cfg: EvalConfig, columns: list[str], rows: list[dict[str, Any]], answered: dict[str, dict[str, list]],
              losses: dict[str, Any], budget: int) -> dict[str, Any]:
    """summary.json: accuracy overall and per tag for each column, answers cut, eval loss."""
    by_column = {column: accuracy(rows, f"{column}_correct") for column in columns}
    return {
        "questions": len(rows),
        "total": by_column["base"]["overall"]["total"],
        **{f"{column}_correct": by_column[column]["overall"]["correct"] for column in columns},
        "columns": columns,
        "max_new_tokens": budget,
        "max_new_tokens_setting": cfg.max_new_tokens,
        "truncated": {column: sum(answered[column]["truncated"]) for column in columns},
        "accuracy": by_column,
        "eval_loss": losses or None,
    }


def asked_of(recipe: Recipe, prompts: list[Prompt], general_prompts: list[Prompt], index: Any,
             tokens_dir: Path | None, log: Log) -> Asked:
    """What both models are asked: the prompts, with the notes retrieved (`index`, a NotesIndex, or
    None), the general questions, the reference answers, the eval split, and the answer budgets."""
    cfg = recipe.evaluation
    questions = [p.question for p in prompts]
    references = (general.reference_answers(cfg.general.references, cfg.general.reference_limit)
                  if cfg.general.references and general_prompts else [])
    return Asked(questions, [index.context(q, cfg.retrieval_k) for q in questions] if index is not None else [],
                 [p.question for p in general_prompts], references,
                 _eval_examples(tokens_dir) if cfg.eval_loss else [],
                 answer_budget(cfg.max_new_tokens, tokens_dir, log), cfg.general.max_new_tokens)


def lab_notes(data_dir: Path | None) -> list[dict[str, Any]]:
    """The data output's notes.json ([] without one)."""
    path = data_dir / "notes.json" if data_dir is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else []


def build_evaluate(recipe: Recipe, store: Store, target_uri: str, tuned_uri: str, log: Log = default_log,
                   data_uri: str | None = None, tokens_uri: str | None = None,
                   on_progress: Callable[[dict], None] | None = None) -> StageResult:
    cfg = recipe.evaluation
    key = evaluate_key(recipe, store, target_uri, tuned_uri, data_uri, tokens_uri)
    data_dir = fetch(store, data_uri, log) if data_uri else None  # fetched once: prompts, notes, retrieval
    prompts = collect_prompts(recipe, data_dir)  # a malformed prompt file fails here, before any model loads
    general_prompts = general.general_questions(cfg.general.questions, cfg.general.limit)

    def build(out: Path) -> dict[str, Any]:
        from labtune.evaluation.retrieval import NotesIndex

        tokens_dir = fetch(store, tokens_uri, log) if tokens_uri else None
        notes = lab_notes(data_dir)
        index = NotesIndex(notes) if cfg.retrieval and notes else None
        asked = asked_of(recipe, prompts, general_prompts, index, tokens_dir, log)
        total, done = 2 * asked.count, [0]  # every answer both models give, for the progress bar

        def answered(count: int) -> None:
            done[0] += count
            if on_progress:
                on_progress({"stage": "evaluate", "step": done[0], "total_steps": total})

        baseline, base = build_baseline(recipe, store, target_uri, asked, log, answered)
        key.inputs["baseline"] = baseline.uri  # in the manifest (not the key): `labtune store gc` keeps it with this output
        references = asked.references or list(zip(asked.general, base.get("general", {}).get("answers", [])))
        tuned_dir = fetch(store, tuned_uri, log)
        tuned = ask_model(recipe, tuned_dir, tuned_uri, asked, "tuned", references, log, answered)
        answered_columns = {**base["columns"], **tuned["columns"]}
        columns, rows = scored_rows(prompts, answered_columns)
        losses = {name: got["eval_loss"] for name, got in (("base", base), ("tuned", tuned)) if got.get("eval_loss")}
        summary = summarize(cfg, columns, rows, answered_columns, losses, asked.budget)
        if index is not None:
            summary["retrieval"] = retrieval_recall(index, prompts, cfg.retrieval_k, recipe.data.date_order)
        general_rows: list[dict[str, Any]] = []
        if general_prompts:
            general_rows, summary["general"] = general.general_summary(
                general_prompts, base, tuned, general.lab_markers(notes), cfg.general)
        trained = tuned_dir / "train_metrics.json"
        if trained.is_file():  # into the training run's TensorBoard folder and MLflow run (train.report_to)
            log_evaluation(recipe.train.report_to, json.loads(trained.read_text()).get("tracked") or {}, summary)
        for warning in [truncation_warning({c: answered_columns[c]["truncated"] for c in columns}, asked.budget),
                        *summary.get("general", {}).get("warnings", [])]:
            if warning:
                log(warning)
        (out / "answers.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        (out / "general.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in general_rows))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "run.json").write_text(json.dumps({"recipe": recipe.model_dump(mode="json"), "target": target_uri,
                                                  "tuned": tuned_uri}, indent=2))
        log("evaluate: " + ", ".join(f"{label} {summary[f'{c}_correct']}/{summary['total']}"
                                     for c, label in COLUMNS if c in columns) + " correct"
            + (f"; eval loss base {losses['base']['loss']} -> fine-tuned {losses['tuned']['loss']}" if len(losses) == 2 else "")
            + (f"; {general.general_line(summary['general'])}" if general_prompts else "")
            + (f"; {recall_line(summary['retrieval'])}" if summary.get("retrieval") else ""))
        return {"summary": summary}

    return run_stage(store, "evaluate", key.key, build, inputs=key.inputs, parameters=key.parameters, log=log)


def read_evaluation(store: Store, uri: str) -> dict[str, Any]:
    """An evaluate output, fetched once: {uri, recipe, rows, general, summary}."""
    return run_from_folder(fetch(store, uri), uri)


def run_from_folder(directory: Path, uri: str) -> dict[str, Any]:
    """{uri, recipe, rows, general, summary} of a fetched (verified, local) evaluate output; any other
    stage's output is refused, naming what it holds."""
    if not all((directory / name).is_file() for name in ("answers.jsonl", "run.json", "summary.json")):
        try:
            stage = json.loads((directory / MANIFEST).read_text()).get("stage", "?")
        except (OSError, ValueError):
            stage = "?"
        raise ManifestError(f"{uri}: not an evaluate output (it holds a {stage} output); give the URIs that the "
                            "evaluate stage prints")
    def lines(name: str) -> list[dict[str, Any]]:  # general.jsonl: [] when it asked no general question
        path = directory / name
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    return {"uri": uri, "recipe": json.loads((directory / "run.json").read_text())["recipe"], "rows": lines("answers.jsonl"),
            "general": lines("general.jsonl"), "summary": json.loads((directory / "summary.json").read_text())}


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
    if summary.get("retrieval"):
        lines += ["", f"Retrieval: {recall_line(summary['retrieval'])}; the + notes columns read what reached the prompt."]
    if summary.get("general"):
        lines += general_markdown(summary["general"])
    return "\n".join(lines + ["", f"Output: `{uri}`"])


def general_markdown(summary: dict[str, Any]) -> list[str]:
    """The general-ability section: chart, the two figures base against fine-tuned, warnings."""
    references = summary["references"]
    return ["", "## General ability", "", png_markdown("general ability", general_chart(summary)), "",
            "| general questions | base | fine-tuned |", "|---|---|---|",
            f"| `hijacked`: answered with the lab's meetings (of {summary['questions']}) | {summary['hijacked']['base']} | "
            f"{summary['hijacked']['tuned']} |",
            f"| perplexity on {references['count']} reference answers ({references['source']}) | "
            f"{references['base_perplexity']} | {references['tuned_perplexity']} (x{references['ratio']}) |",
            f"| answers changed | | {summary['answers_changed']} of {summary['questions']} |",
            *(["", *[f"**{w.removeprefix('evaluate: ')}**" for w in summary["warnings"]]] if summary["warnings"] else [])]
