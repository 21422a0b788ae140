"""Stage 3, data: lab notes, ShareGPT, Alpaca and `messages` data -> one ShareGPT data set.

The conversion itself is `labtune/conversations.py` (loading, cleaning with counts, weighted
mix, seeded split) and `labtune/notes.py` (lab notes -> conversations). This stage fetches the
sources (local or `s3://`), runs it, and writes train.json, eval.json and report.json; the
report becomes the `data-report` artifact (records per source, kept, dropped with reasons).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from labtune import conversations, notes
from labtune.conversations import DataError, convert
from labtune.errors import retry_transient
from labtune.recipe import DataSource, Recipe
from labtune.stage import Log, StageResult, code_version, default_log, read_manifest, run_stage, stage_key
from labtune.store import S3Store, Store, download_tree, open_recipe_store, s3_options, scratch_dir, sha256_file

__all__ = ["DataError", "build_data", "data_task", "report_markdown", "source_identity"]


def source_identity(source: DataSource, s3: dict[str, Any]) -> Any:
    if source.path.startswith("s3://"):
        listing = S3Store(source.path, **s3).list_with_etags("")
        if not listing:
            raise DataError(f"{source.path}: no objects under this prefix")
        return [list(item) for item in listing]
    path = Path(source.path)
    if path.is_dir():
        return {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    if source.type == "lab_notes":
        raise DataError(f"{path}: lab-notes folder not found")
    if not path.is_file():
        raise DataError(f"{path}: {source.type} file not found")
    return sha256_file(path)


def _local_source(source: DataSource, s3: dict[str, Any], scratch: Path) -> Path:
    """A local copy of an s3:// source: a folder (lab notes, a saved dataset) or one file."""
    if not source.path.startswith("s3://"):
        return Path(source.path)
    if not source.path.endswith((".json", ".jsonl", ".parquet")):
        target = scratch / hashlib.sha256(source.path.encode()).hexdigest()[:12]
        download_tree(S3Store(source.path, **s3), "", target)
        return target
    bucket_uri, _, name = source.path.rpartition("/")
    target = scratch / name
    S3Store(bucket_uri, **s3).download(name, target)
    return target


def report_markdown(reports: list[dict[str, Any]], uri: str) -> str:
    lines = ["| source | type | records | kept | dropped | fixed | train | eval |", "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        dropped = ", ".join(f"{n} {k}" for k, n in r["dropped"].items()) or "0"
        fixed = ", ".join(f"{n} {k}" for k, n in r["fixed"].items()) or "-"
        lines.append(f"| {r['source']} | {r['type']} | {r['records']} | {r['kept']} | {dropped} | {fixed} | "
                     f"{r['train']} | {r['eval']} |")
    skipped = [f"- `{r['source']}`: {f}" for r in reports for f in r["skipped_files"]]
    if skipped:
        lines += ["", "**Files skipped**", *skipped]
    listed = [f"- {item}" for r in reports for item in r["dropped_ids"]]
    if listed:
        lines += ["", "**Dropped records** (first 50 per source)", *listed]
    return "\n".join(lines + ["", f"Output: `{uri}`"])


PROMPT_FIELDS = ("presenter", "recorder", "topic")  # short facts a substring check can judge


def heldout_prompts(evaluation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluation prompts from the held-out lab-note question-answer conversations: the question,
    the fact the answer must contain, tags `lab_notes` and the field."""
    return [{"id": r["id"], "question": r["conversations"][0]["value"], "expected": r["fact"]["value"],
             "tags": ["heldout_notes", r["fact"]["field"]]}
            for r in evaluation if r.get("fact", {}).get("field") in PROMPT_FIELDS]


def build_data(recipe: Recipe, store: Store, log: Log = default_log) -> StageResult:
    s3 = s3_options(recipe)
    identities = [source_identity(source, s3) for source in recipe.data.sources]
    parameters = recipe.data.model_dump(mode="json", exclude={"chat_template", "num_proc"})
    key = stage_key("data", code_version(__file__, conversations.__file__, notes.__file__), {"sources": identities},
                    parameters)

    def build(out: Path) -> dict[str, Any]:
        scratch = scratch_dir("data-")
        try:
            paths = [_local_source(source, s3, scratch) for source in recipe.data.sources]
            train, evaluation, reports = convert(recipe.data, paths, log)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        report = [r.as_dict() for r in reports]
        prompts = heldout_prompts(evaluation)
        for record in train + evaluation:
            record.pop("fact", None)
        (out / "eval_prompts.json").write_text(json.dumps(prompts, indent=1, ensure_ascii=False))
        (out / "train.json").write_text(json.dumps(train, indent=1, ensure_ascii=False))
        (out / "eval.json").write_text(json.dumps(evaluation, indent=1, ensure_ascii=False))
        (out / "report.json").write_text(json.dumps(report, indent=2))
        log(f"data: {len(train)} train and {len(evaluation)} eval conversations")
        return {"report": report}

    return run_stage(store, "data", key, build, inputs={"sources": [s.path for s in recipe.data.sources],
                                                        "identities": identities},
                     parameters=parameters, log=log)


@task(name="data", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def data_task(recipe: Recipe) -> StageResult:
    store = open_recipe_store(recipe)
    result = build_data(recipe, store, log=get_run_logger().info)
    manifest = read_manifest(store, store.key_for(result.uri)) or {}
    create_markdown_artifact(key="data-report", markdown=report_markdown(manifest.get("report", []), result.uri),
                             description=f"Data mix for recipe {recipe.name}: records per source, kept and dropped")
    return result
