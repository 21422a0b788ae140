"""Checks that fail a run in seconds, before any stage starts, with one line naming the thing."""

from __future__ import annotations

from labtune.models.sources import model_identity
from labtune.recipe import Recipe
from labtune.stages.data import data_identity

# recipes checked in this process (load_recipe gives one object per recipe): `labtune run` checks
# before it starts Prefect, and the finetune flow it starts does not check again
_CHECKED: list[Recipe] = []


def preflight(recipe: Recipe) -> None:
    """The store is reachable, the base model and delta sources exist, every data source exists
    (and a lab-notes folder has no link leading out of it), and every prompt file reads: the
    evaluation's, the general questions and references, the replay prompts (a bad one would
    otherwise fail the run after training)."""
    if any(checked is recipe for checked in _CHECKED):
        return
    recipe.store.open().check()
    settings = recipe.store.settings()
    for model in filter(None, (recipe.base_model, recipe.delta)):
        if not model.source.startswith("tiny://"):
            model_identity(model, settings)
    for source in recipe.data.sources:
        data_identity(source, settings)
    prompt_files_read(recipe)
    _CHECKED.append(recipe)


def prompt_files_read(recipe: Recipe) -> None:
    from labtune.evaluation import general
    from labtune.evaluation.prompts import load_prompts

    for path in recipe.evaluation.prompt_files:
        load_prompts(path)
    cfg = recipe.evaluation.general
    general.general_questions(cfg.questions, cfg.limit)
    if cfg.references and cfg.questions:
        general.reference_answers(cfg.references, cfg.reference_limit)
    if recipe.data.replay.enabled:
        general.replay_prompts(recipe.data.replay.prompts)
