"""The base model's answers: an output of its own, which the evaluate stage builds first.

What the base model answers (the note questions alone and with the notes retrieved, the general
questions), its eval-split loss and its perplexity on the general reference answers depend only on
the base model, the prompts and the decoding settings, not on training. They are kept under
`baseline/<key>` in the store, keyed by exactly those, so a second fine-tune of the same base
(another learning rate, more epochs, LoRA) reads them instead of generating them again. The
evaluate stage then runs only the fine-tuned model. Output: answers.json.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labtune.evaluation import generation
from labtune.precision import native_bf16
from labtune.recipe import Recipe
from labtune.store.backends import Store
from labtune.store.outputs import Log, StageKey, StageResult, code_version, default_log, fetch, run_stage, stage_key


@dataclass
class Asked:
    """What each model is asked: the note questions, the notes retrieved for each (NotesIndex.context;
    empty without retrieval), the general questions and reference answers ((prompt, answer) pairs: when
    empty, the base model's own answers to the general questions are the references), the eval
    split's tokenized examples, and the two answer budgets."""

    questions: list[str]
    with_notes: list[str]
    general: list[str]
    references: list[tuple[str, str]] = field(default_factory=list)
    eval_examples: list[dict[str, list[int]]] = field(default_factory=list)
    budget: int = 64
    general_budget: int = 64

    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.questions, self.with_notes, self.general, self.references,
                                          self.eval_examples, self.budget, self.general_budget]).encode()).hexdigest()

    @property
    def count(self) -> int:
        """Answers one model gives."""
        return len(self.questions) + len(self.with_notes) + len(self.general)


def answer_all(recipe: Recipe, model: Any, tokenizer: Any, asked: Asked, column: str,
               references: list[tuple[str, str]], answered: Callable[[int], None]) -> dict[str, Any]:
    """One model's answers (column and column_notes), general answers, eval loss, and perplexity on
    the reference answers."""
    template, system, batch = recipe.data.chat_template, recipe.data.system_prompt, recipe.evaluation.batch_size
    got: dict[str, Any] = {"columns": {}, "seconds": {}}
    started = time.time()

    def took(part: str) -> None:
        nonlocal started
        got["seconds"][part] = round(time.time() - started, 1)
        started = time.time()

    for name, notes in ((column, None), (f"{column}_notes", asked.with_notes)):
        if name == column or notes:
            generated = generation.ask(model, tokenizer, asked.questions, asked.budget, batch, template, system, answered,
                                       notes=notes)
            got["columns"][name] = {"answers": generated.answers, "truncated": generated.truncated}
            took("questions" if name == column else "questions with notes")
    if asked.general:
        generated = generation.ask(model, tokenizer, asked.general, asked.general_budget, batch, template, system, answered)
        got["general"] = {"answers": generated.answers, "truncated": generated.truncated}
        references = references or list(zip(asked.general, generated.answers))
        took("general questions")
    if references:
        examples = [generation.encode_answer(tokenizer, q, a, template, system) for q, a in references]
        got["references_loss"] = {**generation.mean_loss(model, examples, batch), "answers": len(examples)}
        took("reference answers")
    if asked.eval_examples:
        got["eval_loss"] = generation.mean_loss(model, asked.eval_examples, batch)
        took("eval loss")
    return got


def ask_model(recipe: Recipe, model_dir: Path, uri: str, asked: Asked, column: str, references: list[tuple[str, str]],
              log: Log, answered: Callable[[int], None]) -> dict[str, Any]:
    """answer_all with the model in `model_dir` (the output at `uri`) loaded for it and freed after."""
    model, tokenizer = generation.load_model(model_dir, bf16=recipe.train.bf16)
    log(f"evaluate: {len(asked.questions)} prompts{' (and again with the notes retrieved)' if asked.with_notes else ''}"
        f" and {len(asked.general)} general questions to the {column} model {uri}")
    try:
        got = answer_all(recipe, model, tokenizer, asked, column, references, answered)
        log(f"evaluate: the {column} model took " + ", ".join(f"{part} {seconds}s" for part, seconds in got["seconds"].items()))
        return got
    finally:
        del model
        gc.collect()


def baseline_key(recipe: Recipe, store: Store, target_uri: str, asked: Asked) -> StageKey:
    parameters = {"chat_template": recipe.data.chat_template, "system_prompt": recipe.data.system_prompt,
                  "bf16": bool(recipe.train.bf16 and native_bf16())}
    inputs = {"target": target_uri, "asked": asked.digest()}
    code = code_version(__name__, "labtune.data.chat", "labtune.evaluation.generation", "labtune.data.raft")
    return StageKey(stage_key("baseline", code, inputs, parameters), inputs, parameters)


def build_baseline(recipe: Recipe, store: Store, target_uri: str, asked: Asked, log: Log = default_log,
                   answered: Callable[[int], None] = lambda count: None) -> tuple[StageResult, dict[str, Any]]:
    """The base (target) model's answers, from the store when an earlier run made them; (result, answers)."""
    key = baseline_key(recipe, store, target_uri, asked)
    made: dict[str, Any] = {}

    def build(out: Path) -> dict[str, Any]:
        made.update(ask_model(recipe, fetch(store, target_uri, log), target_uri, asked, "base", asked.references, log,
                              answered))
        (out / "answers.json").write_text(json.dumps(made, ensure_ascii=False))
        return {}

    result = run_stage(store, "baseline", key.key, build, inputs=key.inputs, parameters=key.parameters, log=log)
    if made:  # answered here: nothing to read back
        return result, made
    answered(asked.count)
    return result, json.loads((fetch(store, result.uri) / "answers.json").read_text())
