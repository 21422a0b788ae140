"""How fast a recipe teaches the notes: held-out accuracy against optimizer steps, in one process.

    python bench/facts_curve.py RECIPE [key=value ...] [--every 30] [--store DIR] [--png curve.png]

Runs the recipe's weights, delta, data and tokenize stages (cached in --store), then trains the
target model in this process with the train stage's settings (AdamW, the recipe's learning rate,
schedule, batch size, epochs, length-grouped batches of labtune.training.worker) and, every --every
optimizer steps and at the end, asks the evaluate stage's prompts (the recipe's questions and the
data stage's recall / paraphrase / reverse / absent prompts) greedily. Prints one row per point:
step, epoch, seconds of training so far, training FLOPs and label tokens so far (the train
stage's count), accuracy per tag, and, with data.augment.dev_questions, the dev questions early
stopping would score (word for word, by teacher forcing) and their loss; the baseline is step 0
(the base model). Freezing (train.freeze_layers) and packing (train.packing) train as the worker
does. With --png the curve is drawn. This is how the demo's epochs and learning rate were chosen
(docs/evaluation.md, "Learning facts fast"): training stops paying where the paraphrase curve flattens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from labtune.training.worker_config import MALLOC_SETTINGS  # noqa: E402

TAGS = ("recipe", "recall", "paraphrase", "reverse", "absent", "presenter", "recorder", "topic")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--every", type=int, default=30, help="optimizer steps between evaluations")
    parser.add_argument("--store", default="/tmp/labtune-facts-curve", help="store for the cached stages")
    parser.add_argument("--png", default=None, help="draw the curve into this PNG")
    parser.add_argument("--answers", default=None, help="write the last evaluation's answers into this JSONL file")
    parser.add_argument("--dev-every", type=int, default=0,
                        help="optimizer steps between dev-question scores alone (one forward pass, no generation)")
    parser.add_argument("--skip-base", action="store_true", help="no evaluation of the base model at step 0")
    args = parser.parse_args()
    if any(name not in os.environ for name in MALLOC_SETTINGS):  # malloc reads them at start: the train stage's settings
        os.execve(sys.executable, [sys.executable, *sys.argv], {**MALLOC_SETTINGS, **os.environ})

    import torch

    from labtune.evaluation import generation
    from labtune.evaluation.prompts import accuracy, score
    from labtune.recipe import load_recipe
    from labtune.stages import run_until
    from labtune.stages.evaluate import answer_budget, collect_prompts
    from labtune.store.outputs import fetch
    from labtune.training.batches import collate, load_examples, micro_batches_per_epoch, rank_batches
    from labtune.training.loss import AnswerLoss
    from labtune.training.model import attention_implementation, freeze, param_groups
    from labtune.training.packing import collate_packed, rank_rows
    from labtune.training.throughput import FlopsModel
    from labtune.training.worker import make_scheduler

    recipe = load_recipe(args.recipe, [*args.overrides, f"store.uri={args.store}"])
    store = recipe.store.open()
    quiet = lambda message: None  # noqa: E731
    data_uri = run_until("data", recipe, store, log=quiet).uri
    target_uri = run_until("delta", recipe, store, log=quiet).uri
    tokens = run_until("tokenize", recipe, store, {"data": data_uri, "delta": target_uri}, log=quiet)
    model_dir = fetch(store, target_uri)
    prompts = collect_prompts(recipe, store, data_uri)
    budget = answer_budget(recipe.evaluation.max_new_tokens, store, tokens.uri, log=quiet)
    tokens_dir = fetch(store, tokens.uri)
    examples, lengths = load_examples(str(tokens_dir / "train"))
    dev = load_examples(str(tokens_dir / "dev"))[0] if (tokens_dir / "dev").is_dir() else None

    from labtune.precision import native_bf16

    # as the worker: bf16 autocast only where the CPU computes bf16 (LABTUNE_NO_NATIVE_BF16=1: fp32)
    train = recipe.train.model_copy(update={"packing_length": recipe.train.packing_length or recipe.data.model_max_length,
                                            "bf16": recipe.train.bf16 and native_bf16()})
    torch.manual_seed(train.seed)
    # fp32 master weights (bf16 is autocast below), the worker's attention, freezing and loss
    model, tokenizer = generation.load_model(model_dir, attn_implementation=attention_implementation(train, torch.device("cpu")))
    model.config.use_cache = False
    frozen = freeze(model, train)
    answer_loss = AnswerLoss(model)
    flops_model = FlopsModel.of(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bs, gas = train.per_device_train_batch_size, train.gradient_accumulation_steps
    micro_per_epoch = micro_batches_per_epoch(train, lengths, 1)
    updates_per_epoch = math.ceil(micro_per_epoch / gas)
    total = max(1, math.ceil(train.num_train_epochs * updates_per_epoch))
    optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.learning_rate, fused=True)
    scheduler = make_scheduler(optimizer, train, total)
    tokens_per_epoch = sum(lengths)
    print(f"{len(lengths)} examples, {tokens_per_epoch:,} tokens per epoch, {total} optimizer steps, "
          f"{len(prompts)} prompts{f', {len(dev)} dev questions' if dev is not None else ''}"
          f"{f'; {frozen}' if frozen else ''}", flush=True)

    curve: list[dict] = []
    spent = {"flops": 0.0, "label_tokens": 0}

    def dev_score() -> dict:
        if dev is None:
            return {}
        right, loss_sum, labels = 0, 0.0, 0
        for start in range(0, len(dev), 16):
            batch = collate([dev[i] for i in range(start, min(start + 16, len(dev)))], pad_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train.bf16):
                exact, loss = answer_loss.exact(model, batch)
            right += int(exact.sum())
            loss_sum += float(loss)
            labels += int((batch["labels"][:, 1:] != -100).sum())
        return {"dev": round(right / len(dev), 3), "dev_loss": round(loss_sum / max(labels, 1), 4)}

    def evaluate(step: int, seconds: float) -> None:
        model.eval()
        started = time.perf_counter()
        answers = generation.ask(model, tokenizer, [p.question for p in prompts], budget,
                                 recipe.evaluation.batch_size, recipe.data.chat_template, recipe.data.system_prompt).answers
        rows = [{"tags": p.tags, "ok": score(a, p)} for p, a in zip(prompts, answers)]
        by_tag = accuracy(rows, "ok")["by_tag"]
        point = {"step": step, "epoch": round(step / updates_per_epoch, 2), "train_s": round(seconds),
                 "flops": f"{spent['flops']:.3g}", "label_tokens": spent["label_tokens"],
                 **{t: by_tag[t]["accuracy"] for t in TAGS if t in by_tag}, **dev_score()}
        curve.append(point)
        if args.answers:
            Path(args.answers).write_text("".join(json.dumps({"tags": p.tags, "question": p.question, "answer": a,
                                                              "ok": r["ok"]}) + "\n"
                                                  for p, a, r in zip(prompts, answers, rows)))
        print(" ".join(f"{k}={v}" for k, v in point.items()) + f" (eval {time.perf_counter() - started:.0f}s)", flush=True)
        model.train()

    if not args.skip_base:
        evaluate(0, 0.0)
    step, seconds, epoch = 0, 0.0, 0
    losses: list[float] = []
    while step < total:
        if train.packing:
            batches = rank_rows(lengths, epoch, train.seed, 0, 1, bs, int(train.packing_length), steps=updates_per_epoch * gas)
        else:
            batches = rank_batches(lengths, epoch, train.seed, 0, 1, bs)
        for start in range(0, len(batches), gas):
            if step >= total:
                break
            began = time.perf_counter()
            window = [collate_packed([[examples[i] for i in row] for row in b], pad_id) if train.packing
                      else collate([examples[i] for i in b], pad_id) for b in batches[start : start + gas]]
            label_tokens = sum(int((w["labels"][:, 1:] != -100).sum()) for w in window)
            step_tokens = sum(int(w["attention_mask"].sum()) for w in window)
            sequences = sum(int(w["segments"]) if "segments" in w else w["input_ids"].shape[0] for w in window)
            spent["flops"] += flops_model.flops(step_tokens, label_tokens, step_tokens / max(sequences, 1))
            spent["label_tokens"] += label_tokens
            for batch in window:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train.bf16):
                    loss = answer_loss(model, batch, max(1, label_tokens))
                loss.backward()
            if train.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds += time.perf_counter() - began
            losses.append(float(loss.detach()))
            if step % 10 == 0:
                print(f"  step {step} loss {sum(losses[-10:]) / 10:.4f}", flush=True)
            if args.dev_every and step % args.dev_every == 0 and not (step % args.every == 0 or step == total):
                model.eval()
                print(f"step={step} epoch={round(step / updates_per_epoch, 2)} flops={spent['flops']:.3g} "
                      f"label_tokens={spent['label_tokens']} " + " ".join(f"{k}={v}" for k, v in dev_score().items()),
                      flush=True)
                model.train()
            if step % args.every == 0 or step == total:
                evaluate(step, seconds)
        epoch += 1

    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(7, 4))
        for tag in (*TAGS[:5], "dev"):
            if tag in curve[0]:
                axes.plot([float(p["flops"]) for p in curve], [p[tag] for p in curve], marker="o", label=tag,
                          linestyle=":" if tag == "dev" else "-")
        axes.set_xlabel("training FLOPs")
        axes.set_ylabel("accuracy")
        axes.set_ylim(0, 1)
        axes.legend()
        figure.tight_layout()
        figure.savefig(args.png)
        print(f"curve: {args.png}")


if __name__ == "__main__":
    main()
