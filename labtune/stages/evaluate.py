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
from pathlib import Path
from typing import Any

import labtune
from labtune import evaluation
from labtune.evaluation import Prompt, load_prompts, score
from labtune.recipe import Recipe
from labtune.stage import MANIFEST, Log, ManifestError, StageResult, code_version, default_log, fetch, run_stage, stage_key
from labtune.store import Store, source_sha256


def collect_prompts(recipe: Recipe, store: Store, data_uri: str | None) -> list[Prompt]:
    """The recipe's questions, its prompt files, then the held-out lab-note questions."""
    prompts = [p.model_copy(update={"tags": p.tags or ["recipe"]}) for p in recipe.evaluation.questions]
    for path in recipe.evaluation.prompt_files:
        prompts += load_prompts(path, default_tag=Path(path).stem)
    if recipe.evaluation.heldout_notes and data_uri:
        held_out = fetch(store, data_uri) / "eval_prompts.json"
        if held_out.is_file():
            prompts += [Prompt(**entry) for entry in json.loads(held_out.read_text())]
    return prompts


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


def evaluate_key(recipe: Recipe, base_uri: str, model_uri: str, data_uri: str | None,
                 tokens_uri: str | None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The evaluate stage's key, inputs and parameters (prompt files by their sha256)."""
    cfg = recipe.evaluation
    parameters = {**cfg.model_dump(mode="json"), "chat_template": recipe.data.chat_template}
    files = {p: source_sha256(p) for p in cfg.prompt_files + ([cfg.retention_questions] if cfg.retention_questions else [])
             if Path(p).is_file()}
    code = code_version(__file__, Path(labtune.__file__).parent / "chat.py", evaluation.__file__)
    inputs = {"base": base_uri, "model": model_uri, "data": data_uri, "tokens": tokens_uri, "prompt_files": files}
    return stage_key("evaluate", code, inputs, parameters), inputs, parameters


def build_evaluate(recipe: Recipe, store: Store, base_uri: str, model_uri: str, log: Log = default_log,
                   data_uri: str | None = None, tokens_uri: str | None = None) -> StageResult:
    cfg = recipe.evaluation
    key, inputs, parameters = evaluate_key(recipe, base_uri, model_uri, data_uri, tokens_uri)
    prompts = collect_prompts(recipe, store, data_uri)  # a malformed prompt file fails here, before any model loads
    general = retention_prompts(recipe)
    template = recipe.data.chat_template

    def build(out: Path) -> dict[str, Any]:
        eval_examples = _eval_examples(store, tokens_uri) if cfg.eval_loss else []
        answers: dict[str, list[str]] = {}
        general_answers: dict[str, list[str]] = {}
        losses: dict[str, Any] = {}
        drift: dict[str, Any] = {}
        for name, uri in (("base", base_uri), ("tuned", model_uri)):
            model, tokenizer = evaluation.load_model(fetch(store, uri, log))
            log(f"evaluate: {len(prompts)} prompts and {len(general)} general questions to the {name} model {uri}")
            answers[name] = evaluation.ask(model, tokenizer, [p.question for p in prompts], cfg.max_new_tokens,
                                           cfg.batch_size, template) if prompts else []
            if eval_examples:
                losses[name] = evaluation.mean_loss(model, eval_examples, cfg.batch_size)
            if general:
                questions = [p.question for p in general]
                general_answers[name] = evaluation.ask(model, tokenizer, questions, cfg.max_new_tokens, cfg.batch_size, template)
                # both models scored on the base model's answers: how far the fine-tuned one moved
                on_base = evaluation.answer_examples(tokenizer, questions, general_answers["base"], template)
                drift[name] = evaluation.mean_loss(model, on_base, cfg.batch_size)
            del model
            gc.collect()
        rows = []
        for i, prompt in enumerate(prompts):
            rows.append({"question": prompt.question, "expected": prompt.expected, "regex": prompt.regex, "tags": prompt.tags,
                         "base_answer": answers["base"][i], "tuned_answer": answers["tuned"][i],
                         "base_correct": score(answers["base"][i], prompt), "tuned_correct": score(answers["tuned"][i], prompt)})
        retention_rows = [{"question": p.question, "tags": p.tags, "base_answer": general_answers["base"][i],
                           "tuned_answer": general_answers["tuned"][i]} for i, p in enumerate(general)]
        base_accuracy, tuned_accuracy = evaluation.accuracy(rows, "base_correct"), evaluation.accuracy(rows, "tuned_correct")
        summary: dict[str, Any] = {
            "questions": len(rows),
            "total": base_accuracy["overall"]["total"],
            "base_correct": base_accuracy["overall"]["correct"],
            "tuned_correct": tuned_accuracy["overall"]["correct"],
            "accuracy": {"base": base_accuracy, "tuned": tuned_accuracy},
            "eval_loss": losses or None,
        }
        if drift:
            base_ppl, tuned_ppl = drift["base"]["perplexity"], drift["tuned"]["perplexity"]
            summary["retention"] = {
                "questions": len(general), "source": cfg.retention_questions,
                "base_perplexity_on_base_answers": base_ppl, "tuned_perplexity_on_base_answers": tuned_ppl,
                "drift_ratio": round(tuned_ppl / base_ppl, 4) if base_ppl else None,
                "answers_changed": sum(1 for r in retention_rows if r["base_answer"] != r["tuned_answer"]),
            }
        (out / "answers.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        (out / "retention.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in retention_rows))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "run.json").write_text(json.dumps({"recipe": recipe.model_dump(mode="json"), "base": base_uri,
                                                  "model": model_uri}, indent=2))
        log(f"evaluate: base {summary['base_correct']}/{summary['total']} correct, "
            f"fine-tuned {summary['tuned_correct']}/{summary['total']}"
            + (f"; eval loss base {losses['base']['loss']} -> fine-tuned {losses['tuned']['loss']}" if losses else "")
            + (f"; retention drift x{summary['retention']['drift_ratio']}" if drift else ""))
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
    lines = [f"# Evaluation", "", "| | base | fine-tuned |", "|---|---|---|"]
    accuracy = summary["accuracy"]
    lines.append(f"| all scored prompts | {summary['base_correct']}/{summary['total']} | {summary['tuned_correct']}/{summary['total']} |")
    for tag, tally in accuracy["tuned"]["by_tag"].items():
        base = accuracy["base"]["by_tag"][tag]
        lines.append(f"| tag `{tag}` | {base['correct']}/{base['total']} | {tally['correct']}/{tally['total']} |")
    if summary.get("eval_loss"):
        loss = summary["eval_loss"]
        lines.append(f"| eval-split loss (perplexity) | {loss['base']['loss']} ({loss['base']['perplexity']}) | "
                     f"{loss['tuned']['loss']} ({loss['tuned']['perplexity']}) |")
    if summary.get("retention"):
        r = summary["retention"]
        lines.append(f"| perplexity on the base model's answers to {r['questions']} general questions | "
                     f"{r['base_perplexity_on_base_answers']} | {r['tuned_perplexity_on_base_answers']} "
                     f"(drift x{r['drift_ratio']}) |")
    return "\n".join(lines + ["", f"Output: `{uri}`"])
