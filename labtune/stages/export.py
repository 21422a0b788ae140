"""Stage 7, export (when the recipe sets `export.gguf`): the fine-tuned model as one GGUF file for
llama.cpp, Ollama and LM Studio, with an Ollama Modelfile and the model card, its evaluation table
filled in from the evaluate stage. Cached like every stage: the same model, evaluation and
settings give the same output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from labtune.errors import LabtuneError
from labtune.models import card, gguf_export
from labtune.recipe import Recipe
from labtune.stages.evaluate import columns_of, run_from_folder
from labtune.store.backends import Store
from labtune.store.outputs import Log, StageKey, StageResult, code_version, default_log, fetch, run_stage, stage_key


def export_key(recipe: Recipe, store: Store, tuned_uri: str, evaluation_uri: str) -> StageKey:
    parameters = {**recipe.export.model_dump(mode="json"), "name": recipe.export.name or recipe.name,
                  "chat_template": recipe.data.chat_template, "system_prompt": recipe.data.system_prompt}
    inputs = {"tuned": tuned_uri, "evaluation": evaluation_uri}
    return StageKey(stage_key("export", code_version(__name__, gguf_export, card), inputs, parameters), inputs, parameters)


def build_export(recipe: Recipe, store: Store, tuned_uri: str, evaluation_uri: str, log: Log = default_log) -> StageResult:
    if recipe.export.gguf is None:
        raise LabtuneError("export: the recipe sets no export.gguf (f16, q8_0 or f32)")
    key = export_key(recipe, store, tuned_uri, evaluation_uri)

    def build(out: Path) -> dict[str, Any]:
        tuned_dir = fetch(store, tuned_uri, log)
        summary = run_from_folder(fetch(store, evaluation_uri, log), evaluation_uri)["summary"]
        described = card.with_evaluation(card.card_of_folder(tuned_dir), summary, columns_of(summary))
        written = gguf_export.export_folder(tuned_dir, out, recipe.export.gguf, key.parameters["name"],
                                            recipe.data.chat_template, recipe.data.system_prompt, described)
        log(f"export: {written['gguf']} ({written['bytes'] / 1e6:,.1f} MB), Modelfile and README.md")
        return {"export": written}

    return run_stage(store, "export", key.key, build, inputs=key.inputs, parameters=key.parameters, log=log)
