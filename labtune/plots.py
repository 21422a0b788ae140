"""Pictures for the Prefect UI: a PNG inside a markdown artifact as a data URI, which the UI
shows inline (a file:// link it would not open from an http page), and the evaluation's chart."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any


def png_markdown(alt: str, png: bytes) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def figure_png(figure: Any, dpi: int = 80) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    return buffer.getvalue()


def accuracy_chart(summary: dict[str, Any], columns: list[tuple[str, str]]) -> bytes:
    """Accuracy per evaluation axis (tag), a bar per column (base, base + notes, fine-tuned,
    fine-tuned + notes), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = summary["accuracy"]
    tags = ["all", *accuracy["tuned"]["by_tag"]]

    def share(column: str, tag: str) -> float:
        tally = accuracy[column]["overall"] if tag == "all" else accuracy[column]["by_tag"].get(tag, {})
        return 100 * (tally.get("accuracy") or 0.0)

    figure, axis = plt.subplots(figsize=(max(6.0, 0.7 * len(tags) + 2), 3.6))
    width = 0.8 / len(columns)
    colors = {"base": "#9ca3af", "base_notes": "#d1d5db", "tuned": "#2563eb", "tuned_notes": "#93c5fd"}
    for i, (column, label) in enumerate(columns):
        axis.bar([t + (i - (len(columns) - 1) / 2) * width for t in range(len(tags))],
                 [share(column, tag) for tag in tags], width, label=label, color=colors.get(column))
    axis.set_xticks(range(len(tags)), tags, rotation=30, ha="right")
    axis.set_ylabel("% correct")
    axis.set_ylim(0, 100)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(ncols=len(columns), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.16), frameon=False)
    figure.tight_layout()
    return figure_png(figure)


def general_chart(general: dict[str, Any]) -> bytes:
    """General ability, base against fine-tuned: general answers that talk about the lab's meetings
    (of all asked), and perplexity on the reference answers, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(7.0, 3.0))
    colors = ["#9ca3af", "#2563eb"]
    hijacked = [general["hijacked"]["base"], general["hijacked"]["tuned"]]
    left.bar(["base", "fine-tuned"], hijacked, color=colors)
    left.set_ylim(0, max(general["questions"], 1))
    left.set_title(f"answered with lab meetings (of {general['questions']})", fontsize=9)
    references = general["references"]
    perplexity = [references["base_perplexity"] or 0.0, references["tuned_perplexity"] or 0.0]
    right.bar(["base", "fine-tuned"], perplexity, color=colors)
    if references["base_perplexity"]:
        right.axhline(references["base_perplexity"] * general.get("max_perplexity_ratio", 1.25), color="#dc2626",
                      linestyle="--", linewidth=1, label="warning threshold")
        right.legend(fontsize=7, frameon=False)
    right.set_title(f"perplexity on general references (x{references['ratio']})", fontsize=9)
    for axis in (left, right):
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure_png(figure)


def plot_loss(history: list[dict[str, Any]], path: Path, title: str, dev: list[dict[str, Any]] | None = None) -> None:
    """The loss curve as a PNG beside the model (and the learning rate on a second axis); with
    early stopping, a second panel: the dev questions answered against the training FLOPs spent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 2 if dev else 1, figsize=(11 if dev else 7, 3.5), dpi=100, squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in history], color="tab:blue", marker="." if len(steps) < 60 else None, label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss", color="tab:blue")
    lr_axis = ax.twinx()
    lr_axis.plot(steps, [r["learning_rate"] for r in history], color="tab:gray", linewidth=1, linestyle="--")
    lr_axis.set_ylabel("learning rate", color="tab:gray")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if dev:
        flops = {r["step"]: r.get("flops") for r in history}
        points = [(flops.get(e["step"]), e["dev_accuracy"]) for e in dev if flops.get(e["step"]) is not None]
        panel = axes[0][1]
        panel.plot([x for x, _ in points], [100 * y for _, y in points], color="tab:green", marker="o")
        panel.set_xlabel("training FLOPs")
        panel.set_ylabel("dev questions answered (%)")
        panel.set_ylim(0, 100)
        panel.set_title("held-out wordings (early stopping)")
        panel.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
