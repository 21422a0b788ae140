"""Stage 3, replay: the base model's own answers to general prompts, mixed into training (self-replay).

A fine-tune on lab notes alone answers "What is the capital of France?" with a meeting fact. With
`data.replay.enabled`, the target model (the delta stage's output) answers `data.replay.count`
general prompts (labtune's own, never the evaluation's) in the chat template and with the system
prompt training uses, greedily (`temperature` above 0: drawn from its own distribution, which
measured no better on the demo); the tokenize stage adds these conversations to the training
split. Training then pulls general behaviour toward what the model already says (its own words
cost it little loss) rather than toward another model's style. An answer cut at
`max_new_tokens` ends at its last whole sentence, so the model is never taught to stop mid-sentence.
The output depends only on the model, the prompts and the decoding settings: a second fine-tune of
the same base reuses it. Output: replay.json (ShareGPT records) and report.json.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

from labtune.data.conversations import REPLAY_PREFIX
from labtune.evaluation import general, generation
from labtune.precision import native_bf16
from labtune.recipe import Recipe
from labtune.store.backends import Store
from labtune.store.outputs import Log, StageKey, StageResult, code_version, default_log, fetch, run_stage, stage_key

SENTENCE_END = re.compile(r"(?<!\d)[.!?](?=\s|$)|\n")  # not "2." of a numbered list


def chosen_prompts(recipe: Recipe) -> list[str]:
    """The replay prompts: the file's first `count` after a shuffle seeded by data.seed."""
    prompts = general.replay_prompts(recipe.data.replay.prompts)
    random.Random(recipe.data.seed).shuffle(prompts)
    return prompts[: recipe.data.replay.count]


def whole_sentences(answer: str) -> str:
    """An answer cut at the token limit, up to its last sentence end ("" when it has none)."""
    ends = [m.end() for m in SENTENCE_END.finditer(answer)]
    return answer[: ends[-1]].rstrip() if ends else ""


def replay_key(recipe: Recipe, store: Store, target_uri: str) -> StageKey:
    cfg = recipe.data.replay
    prompts = chosen_prompts(recipe)
    parameters = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": recipe.data.seed,
                  "chat_template": recipe.data.chat_template,
                  "system_prompt": recipe.data.system_prompt, "bf16": bool(recipe.train.bf16 and native_bf16())}
    inputs = {"target": target_uri, "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}
    return StageKey(stage_key("replay", code_version(__name__, "labtune.evaluation.generation"), inputs, parameters),
                    inputs, parameters)


def replay_records(prompts: list[str], answers: list[str], truncated: list[bool], system: str | None
                   ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """ShareGPT records of the answers (cut ones to their last whole sentence), and the counts."""
    records, counts = [], {"prompts": len(prompts), "cut_to_a_sentence": 0, "left_out_no_sentence": 0}
    for index, (prompt, answer, cut) in enumerate(zip(prompts, answers, truncated)):
        if cut:
            answer = whole_sentences(answer)
            counts["cut_to_a_sentence" if answer else "left_out_no_sentence"] += 1
        if not answer.strip():
            continue
        turns = ([{"from": "system", "value": system}] if system is not None else [])
        records.append({"id": f"{REPLAY_PREFIX}{index}", "conversations": [
            *turns, {"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]})
    counts["conversations"] = len(records)
    return records, counts


def build_replay(recipe: Recipe, store: Store, target_uri: str, log: Log = default_log) -> StageResult:
    cfg = recipe.data.replay
    key = replay_key(recipe, store, target_uri)

    def build(out: Path) -> dict[str, Any]:
        prompts = chosen_prompts(recipe)
        model, tokenizer = generation.load_model(fetch(store, target_uri, log), bf16=recipe.train.bf16)
        log(f"replay: the model {target_uri} answers {len(prompts)} general prompts (at most {cfg.max_new_tokens} "
            "tokens each)")
        sampling = generation.Sampling(cfg.temperature, recipe.data.seed) if cfg.temperature > 0 else None
        generated = generation.ask(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, recipe.data.chat_template,
                                   recipe.data.system_prompt, sampling=sampling)
        records, counts = replay_records(prompts, generated.answers, generated.truncated, recipe.data.system_prompt)
        report = {**counts, "tokens_generated": generated.tokens, "max_new_tokens": cfg.max_new_tokens,
                  "prompts_file": str(general.BUILTIN_REPLAY if cfg.prompts == "builtin" else cfg.prompts)}
        (out / "replay.json").write_text(json.dumps(records, indent=1, ensure_ascii=False))
        (out / "report.json").write_text(json.dumps(report, indent=2))
        log(f"replay: {counts['conversations']} conversations for training ({counts['cut_to_a_sentence']} answers cut "
            f"at the token limit end at their last sentence, {counts['left_out_no_sentence']} left out)")
        return {"report": report}

    return run_stage(store, "replay", key.key, build, inputs=key.inputs, parameters=key.parameters, log=log)


def replay_conversations(store: Store, replay_uri: str | None) -> list[dict[str, Any]]:
    """The replay output's training conversations ([] without one)."""
    if not replay_uri:
        return []
    return json.loads((fetch(store, replay_uri) / "replay.json").read_text())


def replay_markdown(report: dict[str, Any], records: list[dict[str, Any]], uri: str, shown: int = 12) -> str:
    """The `replay` artifact: the counts, then the first prompts with the answers training will see."""
    lines = [f"**{report['conversations']}** of {report['prompts']} general prompts answered by the base model join "
             f"the training set ({report['cut_to_a_sentence']} cut at {report['max_new_tokens']} tokens end at their last "
             f"sentence; {report['left_out_no_sentence']} left out).", "", "| prompt | the base model's answer |", "|---|---|"]
    for record in records[:shown]:
        prompt, answer = (t["value"].replace("\n", " ").replace("|", "\\|") for t in record["conversations"][-2:])
        lines.append(f"| {prompt} | {answer[:200]}{'…' if len(answer) > 200 else ''} |")
    return "\n".join(lines + ["", f"Output: `{uri}`"])
