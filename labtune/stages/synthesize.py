"""Stage 4b, synthesize: a generator model writes study material about each note (data.synthesize).

The generator (the target model, the delta stage's output, or `data.synthesize.generator`: a model
folder or a stage output's URI) reads each meeting's note from the data stage's notes.json and
writes `questions_per_note` question-answer pairs and `rewrites` retellings, on a GPU where the
worker has one (`deployments.synthesize` sends the stage to the GPU work pool). Only pairs faithful
to their note are kept (labtune/data/synthesis.py: every name, number and date of an answer is in
the note); the tokenize stage adds them to the train split. Output: synthesize.json (ShareGPT
records) and report.json (what was written, kept, and left out by reason).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from labtune.data import synthesis
from labtune.errors import LabtuneError
from labtune.evaluation import generation
from labtune.recipe import Recipe
from labtune.store.backends import Store
from labtune.store.outputs import Log, StageKey, StageResult, code_version, default_log, fetch, fetch_output, run_stage, stage_key


class SynthesizeError(LabtuneError):
    """The generator the recipe names cannot be used; the message names it."""


def synthesize_key(recipe: Recipe, store: Store, target_uri: str, data_uri: str) -> StageKey:
    cfg = recipe.data.synthesize
    inputs = {"generator": cfg.generator or target_uri, "data": data_uri}
    parameters = {**cfg.model_dump(mode="json", exclude={"generator", "enabled", "batch_size"}), "seed": recipe.data.seed,
                  "chat_template": recipe.data.chat_template}
    return StageKey(stage_key("synthesize", code_version(__name__, synthesis), inputs, parameters), inputs, parameters)


def generator_folder(recipe: Recipe, store: Store, target_uri: str, log: Log) -> Path:
    """The generator's local folder: the target model, a stage output (one with a manifest), or a model folder."""
    named = recipe.data.synthesize.generator
    if named is None:
        return fetch(store, target_uri, log)
    if "://" in named or (Path(named) / "manifest.json").is_file():
        return fetch_output(named, recipe.store.settings(), log)
    if not (Path(named) / "config.json").is_file():
        raise SynthesizeError(f"data.synthesize.generator: {named}: not a model folder (no config.json) and not a stage output")
    return Path(named)


def build_synthesize(recipe: Recipe, store: Store, target_uri: str, data_uri: str, log: Log = default_log) -> StageResult:
    cfg = recipe.data.synthesize
    key = synthesize_key(recipe, store, target_uri, data_uri)

    def build(out: Path) -> dict[str, Any]:
        notes = json.loads((fetch(store, data_uri, log) / "notes.json").read_text())
        model, tokenizer = generation.load_model(generator_folder(recipe, store, target_uri, log), bf16=True, gpu=True)
        log(f"synthesize: the generator writes {cfg.questions_per_note} question-answer pairs and {cfg.rewrites} "
            f"retelling(s) for each of {len(notes)} notes (at most {cfg.max_new_tokens} tokens each)")
        asks = [ask for note in notes for ask in synthesis.asks(note, cfg.questions_per_note, cfg.rewrites)]
        sampling = generation.Sampling(cfg.temperature, recipe.data.seed) if cfg.temperature > 0 else None
        generated = generation.ask(model, tokenizer, asks, cfg.max_new_tokens, cfg.batch_size, recipe.data.chat_template,
                                   None, sampling=sampling)
        counts: dict[str, int] = {"notes": len(notes)}
        records, per_note = [], 1 + cfg.rewrites
        for n, note in enumerate(notes):
            answers = generated.answers[n * per_note:(n + 1) * per_note]
            records += synthesis.synthesized_records(note, answers[0], answers[1:], counts)
        report = {**counts, "tokens_generated": generated.tokens, "cut_at_the_token_limit": sum(generated.truncated)}
        (out / "synthesize.json").write_text(json.dumps(records, indent=1, ensure_ascii=False))
        (out / "report.json").write_text(json.dumps(report, indent=2))
        left_out = ", ".join(f"{v} {k.removeprefix('left_out_')}" for k, v in sorted(counts.items()) if k.startswith("left_out_"))
        log(f"synthesize: {counts.get('kept', 0)} of {counts.get('written', 0)} written pairs are faithful to their note "
            f"and join training" + (f" (left out, by what was not in the note: {left_out})" if left_out else ""))
        return {"report": report}

    return run_stage(store, "synthesize", key.key, build, inputs=key.inputs, parameters=key.parameters, log=log)


def synthesized_conversations(store: Store, synthesize_uri: str | None) -> list[dict[str, Any]]:
    """The synthesize output's training conversations ([] without one)."""
    if not synthesize_uri:
        return []
    return json.loads((fetch(store, synthesize_uri) / "synthesize.json").read_text())


def synthesize_markdown(report: dict[str, Any], records: list[dict[str, Any]], uri: str, shown: int = 12) -> str:
    """The `synthesize` artifact: the counts, then the first kept pairs."""
    left_out = [f"{v} {k.removeprefix('left_out_')}" for k, v in sorted(report.items()) if k.startswith("left_out_")]
    lines = [f"**{report.get('kept', 0)}** of {report.get('written', 0)} question-answer pairs written about "
             f"{report['notes']} notes are faithful to their note and join training"
             + (f" (left out, by what was not in the note: {', '.join(left_out)})." if left_out else "."),
             "", "| question | answer |", "|---|---|"]
    for record in records[:shown]:
        question, answer = (t["value"].replace("\n", " ").replace("|", "\\|") for t in record["conversations"][-2:])
        lines.append(f"| {question} | {answer[:200]} |")
    return "\n".join(lines + ["", f"Output: `{uri}`"])
