"""The watch-lab-notes flow: fingerprint the recipe's lab-notes sources and, when the fingerprint
differs from the last one seen, emit the Prefect event `labtune.labnotes.updated`. The finetune
deployment's trigger starts a retraining run from that event.

    python flows/watch.py examples/tiny.yaml [key=value ...]
"""

from __future__ import annotations

import sys
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from labtune.data import watch
from labtune.errors import LabtuneError
from labtune.recipe import load_recipe

EVENT = "labtune.labnotes.updated"


def notes_state(recipe) -> dict[str, Any]:
    """The recipe's lab-notes sources: their listings and one fingerprint over all of them."""
    sources = [s.path for s in recipe.data.sources if s.type == "lab_notes"]
    if not sources:
        raise LabtuneError(f"recipe {recipe.name}: no lab_notes source to watch")
    listings = {source: watch.note_listing(source, recipe.store.settings()) for source in sources}
    combined = [{**item, "name": f"{index}/{item['name']}"} for index, source in enumerate(sources)
                for item in listings[source]]
    return {"sources": sources, "listings": listings, "fingerprint": watch.fingerprint(combined)}


@flow(name="watch-lab-notes", log_prints=True)
def watch_lab_notes(recipe_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Emit `labtune.labnotes.updated` when the lab notes differ from the last fingerprint seen."""
    logger = get_run_logger()
    recipe = load_recipe(recipe_path, overrides or [])
    store = recipe.store.open()
    state = notes_state(recipe)
    resource = "labtune.labnotes." + watch.source_id("|".join(state["sources"]))
    previous = watch.load_state(store, resource) or {"fingerprint": None, "listings": {}}
    if previous["fingerprint"] == state["fingerprint"]:
        logger.info(f"lab notes unchanged (fingerprint {state['fingerprint']}); nothing to do")
        return {"changed": False, "fingerprint": state["fingerprint"]}
    diff: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
    for source in state["sources"]:
        for kind, names in watch.changes(previous["listings"].get(source, []), state["listings"][source]).items():
            diff[kind] += [f"{source}/{name}" for name in names]
    payload = {"recipe_path": recipe_path, "overrides": list(overrides or []), "fingerprint": state["fingerprint"],
               "previous_fingerprint": previous["fingerprint"], **diff}
    emit_event(event=EVENT, resource={"prefect.resource.id": resource, "prefect.resource.name": ", ".join(state["sources"])},
               payload=payload)
    watch.save_state(store, resource, {"fingerprint": state["fingerprint"], "listings": state["listings"], "seen": time.time()})
    summary = (f"fingerprint {previous['fingerprint']} -> {state['fingerprint']}: {len(diff['added'])} added, "
               f"{len(diff['changed'])} changed, {len(diff['removed'])} removed")
    logger.info(f"lab notes updated: {summary}; emitted {EVENT}")
    create_markdown_artifact(key="lab-notes-changes", markdown=changes_markdown(payload),
                             description="Which lab notes changed since the last fingerprint")
    return {"changed": True, **payload}


def changes_markdown(payload: dict[str, Any]) -> str:
    lines = ["# Lab notes changed", "", f"Fingerprint `{payload.get('previous_fingerprint')}` → `{payload['fingerprint']}`", ""]
    for kind in ("added", "changed", "removed"):
        names = payload.get(kind) or []
        lines.append(f"**{kind}** ({len(names)}): " + (", ".join(f"`{n}`" for n in names[:50]) or "none"))
    return "\n".join(lines)


if __name__ == "__main__":
    watch_lab_notes(sys.argv[1], sys.argv[2:])
