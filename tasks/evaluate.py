"""Stage 5, evaluate: ask the recipe's questions to the base and the fine-tuned model.

Greedy, batched generation with left padding, prompts built exactly as in training. An answer
is correct when it contains the expected text (case-insensitive). Output: answers.jsonl (one
line per question) and summary.json in the store, and a Prefect table artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

import labtune
from labtune.errors import retry_transient
from labtune.recipe import Recipe
from labtune.stage import Log, StageResult, code_version, default_log, fetch, run_stage, stage_key
from labtune.store import Store, open_recipe_store


def is_correct(answer: str, expected: str | None) -> bool | None:
    if expected is None:
        return None
    return expected.strip().lower() in answer.lower()


def generate_answers(model_dir: Path, questions: list[str], max_new_tokens: int, batch_size: int,
                     template: str = "auto") -> list[str]:
    """Greedy answers, batch_size questions at a time, left-padded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from labtune.chat import prompt_ids, stop_token_ids

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        prompts = [prompt_ids(tokenizer, q, template) for q in questions[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=stops, pad_token_id=pad_id)
        for row in output[:, width:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def build_evaluate(recipe: Recipe, store: Store, base_uri: str, model_uri: str, log: Log = default_log) -> StageResult:
    parameters = {**recipe.evaluation.model_dump(mode="json"), "chat_template": recipe.data.chat_template}
    code = code_version(__file__, Path(labtune.__file__).parent / "chat.py")
    key = stage_key("evaluate", code, {"base": base_uri, "model": model_uri}, parameters)
    questions = [q.question for q in recipe.evaluation.questions]

    def build(out: Path) -> dict[str, Any]:
        cfg = recipe.evaluation
        answers = {}
        for name, uri in (("base", base_uri), ("tuned", model_uri)):
            log(f"evaluate: asking {len(questions)} questions to the {name} model {uri}")
            answers[name] = generate_answers(fetch(store, uri, log), questions, cfg.max_new_tokens, cfg.batch_size,
                                             recipe.data.chat_template) if questions else []
        rows = []
        for i, q in enumerate(recipe.evaluation.questions):
            rows.append({"question": q.question, "expected": q.expected,
                         "base_answer": answers["base"][i], "tuned_answer": answers["tuned"][i],
                         "base_correct": is_correct(answers["base"][i], q.expected),
                         "tuned_correct": is_correct(answers["tuned"][i], q.expected)})
        summary = {
            "total": sum(1 for q in recipe.evaluation.questions if q.expected is not None),
            "base_correct": sum(1 for r in rows if r["base_correct"]),
            "tuned_correct": sum(1 for r in rows if r["tuned_correct"]),
            "questions": len(rows),
        }
        (out / "answers.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log(f"evaluate: base {summary['base_correct']}/{summary['total']} correct, "
            f"fine-tuned {summary['tuned_correct']}/{summary['total']}")
        return {"summary": summary}

    return run_stage(store, "evaluate", key, build, inputs={"base": base_uri, "model": model_uri},
                     parameters=parameters, log=log)


def read_evaluation(store: Store, uri: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, rows) of an evaluate output."""
    directory = fetch(store, uri)
    rows = [json.loads(line) for line in (directory / "answers.jsonl").read_text().splitlines() if line.strip()]
    return json.loads((directory / "summary.json").read_text()), rows


@task(name="evaluate", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def evaluate_task(recipe: Recipe, base_uri: str, model_uri: str) -> StageResult:
    store = open_recipe_store(recipe)
    result = build_evaluate(recipe, store, base_uri, model_uri, log=get_run_logger().info)
    summary, rows = read_evaluation(store, result.uri)
    create_table_artifact(
        key="evaluation",
        table=[{"question": r["question"], "expected": r["expected"], "base answer": r["base_answer"],
                "fine-tuned answer": r["tuned_answer"], "correct": r["tuned_correct"]} for r in rows],
        description=(f"Recipe {recipe.name}: base {summary['base_correct']}/{summary['total']}, "
                     f"fine-tuned {summary['tuned_correct']}/{summary['total']} correct. {result.uri}"),
    )
    return result
