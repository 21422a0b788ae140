"""Stage 4, tokenize: the data stage's conversations -> loss-masked token ids for the target model.

A cached stage of its own, keyed by the data output, the tokenizer files' sha256 (from the model
output's manifest, so the model is not fetched to decide), the chat template and
model_max_length: re-training with other hyperparameters reuses it. See `labtune/data/encode.py`.
Output: `train/` and `eval/` (and, with data.augment.dev_questions, `dev/`) datasets folders and report.json (counts and a token-length
histogram), shown as the `token-report` artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from labtune.data import chat, encode
from labtune.errors import LabtuneError
from labtune.models.merge import TOKENIZER_FILES
from labtune.recipe import Recipe
from labtune.store.backends import Store
from labtune.store.outputs import (
    Log,
    ManifestError,
    StageKey,
    StageResult,
    code_version,
    default_log,
    fetch,
    read_manifest,
    run_stage,
    stage_key,
)


class TokenizeError(LabtuneError):
    """The conversations cannot be tokenized as asked; the message says why."""


def tokenizer_identity(store: Store, target_uri: str) -> dict[str, str]:
    manifest = read_manifest(store, store.key_for(target_uri))
    if manifest is None:
        raise ManifestError(f"{target_uri}: no complete output here (manifest.json missing)")
    files = {e["path"]: e["sha256"] for e in manifest["files"] if e["path"] in TOKENIZER_FILES}
    if not files:
        raise TokenizeError(f"{target_uri}: the model has no tokenizer files")
    return files


def tokenize_files(data_dir: Path, model_dir: Path, out: Path, template: str, max_length: int,
                   num_proc: int | None, log: Log = default_log, replay: list[dict[str, Any]] | None = None,
                   synthesized: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """train.json / eval.json (/ dev.json) in data_dir -> datasets folders train/ and eval/ (/ dev/) in out;
    `replay` conversations (the replay stage's) and `synthesized` ones (the synthesize stage's) join the train split."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    report: dict[str, Any] = {}
    for split in ("train", "eval", "dev"):
        path = data_dir / f"{split}.json"
        if split == "dev" and not path.is_file():
            continue  # dev questions exist only for early stopping
        records = json.loads(path.read_text()) if path.is_file() else []
        if split == "train":
            records = records + (replay or []) + (synthesized or [])
        try:
            report[split] = encode.tokenize_split(records, tokenizer, template, max_length, num_proc, out / split)
        except chat.TemplateError as exc:
            raise TokenizeError(f"data.chat_template: {exc}") from None
        r = report[split]
        log(f"tokenize: {split}: {r['conversations']} conversations -> {r['examples']} examples, {r['tokens']:,} tokens "
            f"({r['template']}; {r['split_conversations']} split to fit {max_length} tokens, "
            f"{r['dropped_pairs']} question-answer pairs too long dropped, {r['num_proc']} process(es))")
    if not report["train"]["examples"]:
        raise TokenizeError(f"{data_dir}: no training example has an assistant token within model_max_length {max_length}")
    report["train"]["replay"] = len(replay or [])
    report["train"]["synthesized"] = len(synthesized or [])
    report["train"]["longest_answer"] = data_longest_answer(out / "train")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def data_longest_answer(folder: Path) -> int:
    """The longest answer of a tokenized split, replay conversations left out: what the evaluation's
    `max_new_tokens: auto` allows for (general answers have a budget of their own)."""
    from datasets import load_from_disk

    from labtune.evaluation.generation import longest_answer_tokens
    from labtune.data.conversations import REPLAY_PREFIX
    from labtune.data.synthesis import SYNTHESIZED_PREFIX

    dataset = load_from_disk(str(folder))
    return longest_answer_tokens(labels for record_id, labels in zip(dataset["id"], dataset["labels"])
                                 if not record_id.startswith((REPLAY_PREFIX, SYNTHESIZED_PREFIX)))


def tokenize_key(recipe: Recipe, store: Store, target_uri: str, data_uri: str, replay_uri: str | None = None,
                 synthesize_uri: str | None = None) -> StageKey:
    inputs = {"target": target_uri, "tokenizer": tokenizer_identity(store, target_uri), "data": data_uri,
              **({"replay": replay_uri} if replay_uri else {}), **({"synthesize": synthesize_uri} if synthesize_uri else {})}
    parameters = {"model_max_length": recipe.data.model_max_length, "chat_template": recipe.data.chat_template}
    # the tokenizer identity, not the target's URI, decides: re-tokenizing for a new model with the same tokenizer is waste
    key = stage_key("tokenize", code_version(__name__, chat, encode),
                    {k: v for k, v in inputs.items() if k != "target"}, parameters)
    return StageKey(key, inputs, parameters)


def build_tokenize(recipe: Recipe, store: Store, target_uri: str, data_uri: str, log: Log = default_log,
                   replay_uri: str | None = None, synthesize_uri: str | None = None) -> StageResult:
    key = tokenize_key(recipe, store, target_uri, data_uri, replay_uri, synthesize_uri)

    def build(out: Path) -> dict[str, Any]:
        from labtune.stages.replay import replay_conversations
        from labtune.stages.synthesize import synthesized_conversations

        target_dir, data_dir = fetch(store, target_uri, log), fetch(store, data_uri, log)
        replay = replay_conversations(store, replay_uri)
        if replay:
            log(f"tokenize: {len(replay)} replay conversations (the base model's own answers) join the train split")
        synthesized = synthesized_conversations(store, synthesize_uri)
        if synthesized:
            log(f"tokenize: {len(synthesized)} model-written question-answer pairs (the synthesize stage's) join the train split")
        report = tokenize_files(data_dir, target_dir, out, recipe.data.chat_template, recipe.data.model_max_length,
                                recipe.data.num_proc, log, replay, synthesized)
        return {"report": {split: {k: v for k, v in r.items() if k != "histogram"} for split, r in report.items()}}

    return run_stage(store, "tokenize", key.key, build, inputs=key.inputs, parameters=key.parameters, log=log)


def report_markdown(report: dict[str, Any], uri: str) -> str:
    lines = ["| split | conversations | examples | tokens | split to fit | pairs too long | unlabelled |",
             "|---|---|---|---|---|---|---|"]
    for split, r in report.items():
        lines.append(f"| {split} | {r['conversations']} | {r['examples']} | {r['tokens']:,} | {r['split_conversations']} | "
                     f"{r['dropped_pairs']} | {r['dropped_unlabelled']} |")
    train = report["train"]
    lines += ["", f"Token lengths of the training examples ({train['template']}):", "",
              "| tokens | examples |", "|---|---|"]
    lines += [f"| {row['tokens']} | {row['examples']} |" for row in train["histogram"]]
    return "\n".join(lines + ["", f"Output: `{uri}`"])
