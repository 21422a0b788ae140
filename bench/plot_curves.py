"""Held-out accuracy against training FLOPs, several `bench/facts_curve.py` runs on one plot.

    python bench/plot_curves.py out.png LABEL=run1.log LABEL=run2.log ... [--point LABEL=FLOPS:ACCURACY ...]

Reads the `step=... flops=... dev=... paraphrase=...` lines facts_curve prints: the dev questions
(early stopping's, scored word for word) as a dotted line per run, the final paraphrase accuracy
(held-out wordings, generated and scored by the evaluation's scorer) as a marker. --point adds a
run known only by its end (a recipe measured through `labtune run`).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def read(log: Path) -> list[dict[str, float]]:
    points = []
    for line in log.read_text().splitlines():
        if not line.startswith("step="):
            continue
        fields = dict(re.findall(r"(\w+)=([0-9.e+-]+)", line))
        points.append({k: float(v) for k, v in fields.items()})
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("png")
    parser.add_argument("runs", nargs="+", help="LABEL=facts_curve.log")
    parser.add_argument("--point", action="append", default=[], help="LABEL=FLOPS:ACCURACY")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.2), dpi=100)
    for i, run in enumerate(args.runs):
        label, _, path = run.partition("=")
        points = read(Path(path))
        color = f"C{i}"
        dev = [(p["flops"], 100 * p["dev"]) for p in points if "dev" in p]
        axes.plot([x for x, _ in dev], [y for _, y in dev], linestyle=":", marker=".", color=color,
                  label=f"{label}: dev questions")
        final = [p for p in points if "paraphrase" in p]
        if final:
            axes.plot(final[-1]["flops"], 100 * final[-1]["paraphrase"], marker="*", markersize=14, color=color,
                      linestyle="none", label=f"{label}: paraphrase at the end")
    for j, point in enumerate(args.point):
        label, _, value = point.partition("=")
        flops, accuracy = (float(v) for v in value.split(":"))
        axes.plot(flops, 100 * accuracy, marker="D", markersize=9, color=f"C{len(args.runs) + j}", linestyle="none",
                  label=label)
    axes.set_xlabel("training FLOPs")
    axes.set_ylabel("held-out questions answered (%)")
    axes.set_ylim(0, 102)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(args.png)
    print(args.png)


if __name__ == "__main__":
    main()
