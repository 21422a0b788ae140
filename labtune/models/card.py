"""The model card: a README.md in the Hugging Face format (a YAML header the Hub reads, then what a
reader wants to know) for a fine-tuned model: what it started from, what it learned from, how it
was trained, and, once evaluated, how it scored in the four columns and on every axis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def base_license(base_dir: Path | None) -> str:
    """The license the base model's own card declares (its YAML header), else "other"."""
    card = base_dir / "README.md" if base_dir is not None else None
    declared = card_header(card.read_text()).get("license") if card is not None and card.is_file() else None
    return declared if isinstance(declared, str) and declared else "other"


def data_lines(data_report: list[dict[str, Any]] | None, tokens_report: dict[str, Any] | None) -> list[str]:
    lines = []
    for source in data_report or []:
        notes = source.get("notes") or []
        facts = sum(sum(n.get("facts", {}).values()) for n in notes)
        what = f"{len(notes)} meeting(s), {facts} facts" if notes else f"{source.get('kept', 0)} conversations"
        lines.append(f"- `{source.get('source', source.get('path', 'data'))}`: {source.get('files', '?')} file(s), {what}, "
                     f"{source.get('kept', 0)} training conversations")
    train = (tokens_report or {}).get("train") or {}
    if train:
        lines.append(f"- tokenized: {train.get('examples', 0):,} examples, {train.get('tokens', 0):,} tokens "
                     f"(chat template `{train.get('template', '?')}`)")
    return lines or ["- (no data report)"]


def training_lines(parameters: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    train = parameters.get("train", {})
    keys = ("num_train_epochs", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
            "lr_scheduler_type", "freeze_layers", "lora", "bf16")
    settings = ", ".join(f"`{k}` {train[k]}" for k in keys if k in train)
    lines = [f"- settings: {settings}"] if settings else []
    if metrics:
        lines.append(f"- {metrics.get('optimizer_steps', '?')} optimizer steps over {metrics.get('examples', '?')} examples "
                     f"in {metrics.get('train_seconds', 0):.0f} s on {metrics.get('world_size', 1)} process(es); "
                     f"{metrics.get('train_flops', 0):.2e} training FLOPs, "
                     f"{metrics.get('train_label_tokens', 0):,} label tokens")
    return lines or ["- (no training metrics)"]


def evaluation_lines(summary: dict[str, Any] | None, columns: list[tuple[str, str]]) -> list[str]:
    """The evaluation table: all questions and every tag, one column per (column, label)."""
    if not summary:
        return [NOT_EVALUATED]

    def cell(tally: dict[str, Any]) -> str:
        return f"{tally['correct']}/{tally['total']}"

    lines = ["| questions | " + " | ".join(label for _, label in columns) + " |", "|---" * (len(columns) + 1) + "|",
             "| all | " + " | ".join(cell(summary["accuracy"][c]["overall"]) for c, _ in columns) + " |"]
    for tag in summary["accuracy"]["tuned"]["by_tag"]:
        lines.append(f"| `{tag}` | " + " | ".join(cell(summary["accuracy"][c]["by_tag"][tag]) for c, _ in columns) + " |")
    general = summary.get("general")
    if general:
        references = general["references"]
        lines += ["", f"General ability, base / fine-tuned: {general['hijacked']['base']} / {general['hijacked']['tuned']} of "
                  f"{general['questions']} general questions answered with the lab's meetings; perplexity on "
                  f"{references['count']} general reference answers {references['base_perplexity']} / "
                  f"{references['tuned_perplexity']} (x{references['ratio']})."]
    lines += ["", "Base and fine-tuned model answer the same questions, alone and with the meeting's note retrieved "
              "into the prompt (BM25); greedy, scored by whole-word match (labtune's docs/evaluation.md)."]
    return lines


def model_card(name: str, base: str, license_: str, recipe: dict[str, Any] | None, parameters: dict[str, Any],
               metrics: dict[str, Any], data_report: list[dict[str, Any]] | None = None,
               tokens_report: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None,
               columns: list[tuple[str, str]] = ()) -> str:
    """README.md text: the YAML header (base model, license, library, tags), then base, data,
    training and evaluation."""
    header = {"base_model": base, "license": license_, "library_name": "transformers",
              "tags": ["labtune", "llama", "fine-tuned", "lab-notes"], "pipeline_tag": "text-generation"}
    data = (recipe or {}).get("data") or {}
    system = data.get("system_prompt")
    if recipe:  # how it was asked in training, for an export's Modelfile
        header["labtune"] = {"name": name, "system_prompt": system, "chat_template": data.get("chat_template", "auto")}
    body = [f"# {name}", "", f"Fine-tuned from `{base}` with labtune on a lab's own notes (the FastChat/Vicuna "
            "recipe: supervised fine-tuning on conversations, loss on the answers only).", "",
            "## Data", "", *data_lines(data_report, tokens_report), "",
            "## Training", "", *training_lines(parameters, metrics), "",
            "## Evaluation", "", *evaluation_lines(evaluation, list(columns)), "",
            "## Use", "", "Ask it the way it was taught: the chat template in `tokenizer_config.json` (or the GGUF's), "
            + ("with the system prompt " + json.dumps(system) + "." if system is not None else
               "with the template's own system prompt."), ""]
    if recipe:
        body += ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n" + "\n".join(body)


NOT_EVALUATED = "Not evaluated with this folder: the run's evaluate stage (and `labtune export`) write the table."


def with_evaluation(card: str, summary: dict[str, Any], columns: list[tuple[str, str]]) -> str:
    """A model folder's card with the evaluate stage's table in its Evaluation section."""
    table = "\n".join(evaluation_lines(summary, columns))
    if NOT_EVALUATED in card:
        return card.replace(NOT_EVALUATED, table)
    return card.rstrip() + "\n\n## Evaluation\n\n" + table + "\n"


def card_header(card: str) -> dict[str, Any]:
    """The YAML header of a card ({} when it has none)."""
    if not card.startswith("---"):
        return {}
    try:
        return yaml.safe_load(card.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return {}


def card_of_folder(folder: Path) -> str:
    """A model folder's card: its README.md, else one made from its config and, for a store
    output, its manifest (training settings and figures)."""
    if (folder / "README.md").is_file():
        return (folder / "README.md").read_text()
    config = json.loads((folder / "config.json").read_text())
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
    return model_card(folder.name, str(config.get("_model_name_or_path") or "unknown"), "other", None,
                      manifest.get("parameters") or {}, manifest.get("metrics") or {})
