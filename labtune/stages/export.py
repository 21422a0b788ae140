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
from labtune.store.outputs import Log, StageResult, code_version, default_log, fetch, run_stage, stage_key


def export_key(recipe: Recipe, model_uri: str, evaluate_uri: str) -> tuple[str, dict[str, Any]]:
    parameters = {**recipe.export.model_dump(mode="json"), "name": recipe.export.name or recipe.name,
                  "chat_template": recipe.data.chat_template, "system_prompt": recipe.data.system_prompt}
    inputs = {"model": model_uri, "evaluation": evaluate_uri}
    return stage_key("export", code_version(__name__, gguf_export, card), inputs, parameters), parameters


def build_export(recipe: Recipe, store: Store, model_uri: str, evaluate_uri: str, log: Log = default_log) -> StageResult:
    if recipe.export.gguf is None:
        raise LabtuneError("export: the recipe sets no export.gguf (f16, q8_0 or f32)")
    key, parameters = export_key(recipe, model_uri, evaluate_uri)

    def build(out: Path) -> dict[str, Any]:
        model_dir = fetch(store, model_uri, log)
        summary = run_from_folder(fetch(store, evaluate_uri, log), evaluate_uri)["summary"]
        described = card.with_evaluation(card.card_of_folder(model_dir), summary, columns_of(summary))
        written = gguf_export.export_folder(model_dir, out, recipe.export.gguf, parameters["name"],
                                            recipe.data.chat_template, recipe.data.system_prompt, described)
        log(f"export: {written['gguf']} ({written['bytes'] / 1e6:,.1f} MB), Modelfile and README.md")
        return {"export": written}

    return run_stage(store, "export", key, build, inputs={"model": model_uri, "evaluation": evaluate_uri},
                     parameters=parameters, log=log)
