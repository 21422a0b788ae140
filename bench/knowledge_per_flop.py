"""Knowledge per FLOP: two recipes on the same notes, side by side, through labtune's own stages.

    python bench/knowledge_per_flop.py RECIPE BASELINE_RECIPE [--store DIR] [--json out.json] [key=value ...]

Runs each recipe's stages up to evaluate (weights, data and tokenize cached in --store; each
recipe trains and is evaluated as `labtune run` would, without the Prefect server) and prints,
for both and as a ratio: training FLOPs and label tokens (the worker's count), optimizer steps,
train and evaluate seconds on this machine, accuracy per axis of the fine-tuned model, and its
general ability (general answers about the lab's meetings, base -> fine-tuned, and the
perplexity ratio on general reference answers; evaluation.general.references=ALPACA.json names them). The
FLOP ratio holds on any machine; the seconds hold for this one (say which CPU with them:
`lscpu`). With LABTUNE_NO_NATIVE_BF16=1 both take the fp32 path of a CPU without native bf16.
Overrides after the recipes apply to both (e.g. evaluation.retrieval=false).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

AXES = ("recipe", "recall", "paraphrase", "reverse", "absent", "absent_trained", "action", "deadline", "decision",
        "attendance")


def measure(recipe_path: str, overrides: list[str], store_uri: str) -> dict:
    from labtune.recipe import load_recipe
    from labtune.stages import run_until
    from labtune.store.outputs import fetch

    recipe = load_recipe(recipe_path, [*overrides, f"store.uri={store_uri}"])
    store = recipe.store.open()
    quiet = lambda line: None  # noqa: E731
    run_until("tokenize", recipe, store, log=quiet)
    started = time.perf_counter()
    trained = run_until("train", recipe, store, log=quiet)
    train_wall = time.perf_counter() - started
    started = time.perf_counter()
    evaluated = run_until("evaluate", recipe, store, log=quiet)
    evaluate_wall = time.perf_counter() - started
    metrics = json.loads((fetch(store, trained.uri) / "train_metrics.json").read_text())
    summary = json.loads((fetch(store, evaluated.uri) / "summary.json").read_text())
    by_tag = summary["accuracy"]["tuned"]["by_tag"]
    general = summary.get("general") or {}
    return {"hijacked": f"{general['hijacked']['base']} -> {general['hijacked']['tuned']} of {general['questions']}"
            if general else None, "perplexity_ratio": (general.get("references") or {}).get("ratio"),"recipe": recipe.name, "train_flops": metrics.get("train_flops"), "dev_flops": metrics.get("dev_flops"),
            "label_tokens": metrics.get("train_label_tokens"), "steps": metrics["optimizer_steps"],
            "train_s": round(metrics["train_seconds"]), "train_wall_s": round(train_wall) if not trained.cached else None,
            "evaluate_s": round(evaluate_wall) if not evaluated.cached else None,
            "accuracy": {tag: f"{v['correct']}/{v['total']}" for tag, v in by_tag.items() if tag in AXES},
            "cached": {"train": trained.cached, "evaluate": evaluated.cached}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("baseline")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--store", default="/tmp/labtune-knowledge-per-flop")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [measure(path, args.overrides, args.store) for path in (args.recipe, args.baseline)]
    new, old = rows
    print(f"{'':<22}{new['recipe']:>28}{old['recipe']:>28}{'ratio':>10}")
    for key in ("train_flops", "label_tokens", "steps", "train_s", "evaluate_s"):
        a, b = new[key], old[key]
        ratio = f"{a / b:.2f}" if a and b else "-"
        show = (lambda v: f"{v:.3g}") if key.endswith("flops") else (lambda v: f"{v:,}" if v is not None else "cached")
        print(f"{key:<22}{show(a):>28}{show(b):>28}{ratio:>10}")
    for tag in AXES:
        if tag in new["accuracy"] or tag in old["accuracy"]:
            print(f"{tag:<22}{new['accuracy'].get(tag, '-'):>28}{old['accuracy'].get(tag, '-'):>28}")
    for key in ("hijacked", "perplexity_ratio"):
        print(f"{key:<22}{str(new[key]):>28}{str(old[key]):>28}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
