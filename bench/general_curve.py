"""Knowledge and general ability against training FLOPs: one point per fine-tune (a lever tried).

    python bench/general_curve.py LABEL=EVALUATE_URI [LABEL=EVALUATE_URI ...] [--png out.png] [--json out.json]

For each evaluate output (a local store folder) it reads the fine-tuned model's training FLOPs
(the worker's count in train_metrics.json), its accuracy on held-out wordings (`paraphrase`) and
no-meeting dates (`absent`), and its general ability: general answers about the lab's meetings
(`hijacked`, base and fine-tuned) and the perplexity ratio on general reference answers. Prints a
table and draws both against FLOPs, so a lever is kept only where it pays on both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def point(label: str, uri: str) -> dict:
    folder = Path(uri)
    summary = json.loads((folder / "summary.json").read_text())
    model = json.loads((folder / "run.json").read_text())["tuned"]
    metrics = json.loads((Path(model) / "train_metrics.json").read_text())
    tags = summary["accuracy"]["tuned"]["by_tag"]
    general = summary.get("general") or {}

    def share(tag: str) -> float | None:
        return tags[tag]["accuracy"] if tag in tags else None

    return {"label": label, "train_flops": metrics["train_flops"], "paraphrase": share("paraphrase"),
            "absent": share("absent"), "recipe": share("recipe"), "two_part": share("two_part"),
            "hijacked": (general.get("hijacked") or {}).get("tuned"), "hijacked_base": (general.get("hijacked") or {}).get("base"),
            "questions": general.get("questions"), "perplexity_ratio": (general.get("references") or {}).get("ratio")}


def draw(points: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    order = sorted(range(len(points)), key=lambda i: points[i]["train_flops"])
    for rank, p in enumerate(points[i] for i in order):
        x = p["train_flops"]
        # neighbours along FLOPs put their labels on alternate sides, so that close points stay readable
        side = {"xytext": (-3, 3), "ha": "right"} if rank % 2 else {"xytext": (3, 3), "ha": "left"}
        left.scatter(x, 100 * (p["paraphrase"] or 0), color="#2563eb")
        left.annotate(p["label"], (x, 100 * (p["paraphrase"] or 0)), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if p["perplexity_ratio"] is not None:
            right.scatter(x, p["perplexity_ratio"], color="#dc2626")
            right.annotate(f"{p['label']} ({p['hijacked']}/{p['questions']})", (x, p["perplexity_ratio"]), fontsize=7,
                           textcoords="offset points", **side)
    left.set_title("knowledge: held-out wordings answered (%)", fontsize=9)
    right.set_title("general ability: perplexity ratio on references (hijacked/asked)", fontsize=9)
    right.axhline(1.25, color="#6b7280", linestyle="--", linewidth=1)
    right.set_yscale("log")
    for axis in (left, right):
        axis.set_xlabel("training FLOPs")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=EVALUATE_URI")
    parser.add_argument("--png", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    points = [point(*run.split("=", 1)) for run in args.runs]
    print(f"{'lever':<34}{'FLOPs':>10}{'recipe':>8}{'paraphr.':>9}{'absent':>8}{'2-part':>8}{'hijacked':>10}{'ppl x':>8}")
    for p in points:
        pct = lambda v: f"{100 * v:.0f}%" if v is not None else "-"  # noqa: E731
        print(f"{p['label']:<34}{p['train_flops']:>10.3g}{pct(p['recipe']):>8}{pct(p['paraphrase']):>9}{pct(p['absent']):>8}"
              f"{pct(p['two_part']):>8}{str(p['hijacked_base']) + '->' + str(p['hijacked']):>10}{str(p['perplexity_ratio']):>8}")
    if args.png:
        draw(points, args.png)
    if args.json:
        Path(args.json).write_text(json.dumps(points, indent=2))


if __name__ == "__main__":
    main()
