"""GPU training throughput of labtune's FSDP2 worker: tokens/s and MFU on a ~1B random LLaMA.

    python bench/train_mfu.py [--layers 22] [--seq 2048] [--batch 8] [--steps 30] [--nproc 1]
                              [--checkpointing default|none|selective|full] [--compile auto|on|off]

Builds a random LLaMA of TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads,
vocab 32000) and a synthetic tokenized data set of full-length sequences, then runs
`torchrun -m labtune.train_worker` with bf16 mixed precision and FSDP2, and otherwise a recipe's
default settings (no activation checkpointing, torch_compile auto) unless told.
Reports the median over the steps after warm-up of what the worker logs: tokens/s and MFU from
synchronized wall time (labtune/throughput.py: 6 x matmul parameters + 12 x layers x hidden x
length FLOPs per token, over the device's dense bf16 peak from its name), and the peak GPU memory
per rank. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a bare checkout too


def build(work: Path, layers: int, seq: int, examples: int) -> int:
    """The model and data; returns the parameter count."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from labtune.tiny import make_tiny_llama

    make_tiny_llama(work / "model")  # the tokenizer files; the weights are replaced below
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=seq, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    model = LlamaForCausalLM(config)
    model.save_pretrained(work / "model")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (examples, seq), generator=generator).tolist()
    import pyarrow as pa

    table = pa.table({"id": [str(i) for i in range(examples)], "input_ids": pa.array(ids, pa.list_(pa.int32())),
                      "labels": pa.array(ids, pa.list_(pa.int32())), "length": pa.array([seq] * examples, pa.int32())})
    Dataset(table, fingerprint="bench-train-mfu").save_to_disk(str(work / "tokens"))  # no dill hashing
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="per-device micro-batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=1)
    # the defaults are a recipe's defaults: what a user who names only the model, data and bf16 gets
    parser.add_argument("--checkpointing", choices=["default", "none", "selective", "full"], default="default",
                        help="train.gradient_checkpointing: the recipe default (none), none, selective (every 2nd layer), full")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="train.torch_compile: auto (the default: on for CUDA), on, off")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="labtune-bench-mfu-"))
    params = build(work, args.layers, args.seq, args.steps * args.batch * args.nproc)
    from labtune.recipe import TrainConfig
    from labtune.store import StoreSettings
    from labtune.worker_config import WorkerConfig

    settings = {}
    if args.checkpointing != "default":
        settings["gradient_checkpointing"] = {"none": False, "selective": "selective", "full": True}[args.checkpointing]
    if args.compile != "auto":
        settings["torch_compile"] = args.compile == "on"
    train = TrainConfig(num_train_epochs=1, per_device_train_batch_size=args.batch, learning_rate=1e-4, warmup_ratio=0.0,
                        lr_scheduler_type="constant", bf16=True, save_strategy="no", seed=0, **settings)
    WorkerConfig(model_dir=str(work / "model"), train_dir=str(work / "tokens"), output_dir=str(work / "out"),
                 checkpoint_dir=str(work / "checkpoints"), store=StoreSettings(str(work / "store")),
                 train=train).write(work / "config.json")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--master_port=29533",
               "-m", "labtune.train_worker", "--config", str(work / "config.json")]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    records = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            print(line.rstrip(), flush=True)
            if line.startswith("progress "):
                records.append(json.loads(line[len("progress "):]))
    if proc.returncode != 0 or len(records) < 6:
        sys.exit(f"worker failed (exit {proc.returncode}, {len(records)} steps logged)")
    steady = records[5:]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    mfu = statistics.median(mfus) if mfus else None
    peak_memory = max(max(r["peak_memory_gib"]) for r in steady)
    print(f"model: {params / 1e9:.2f}B parameters, sequence {args.seq}, micro-batch {args.batch} x {args.nproc} GPU(s), "
          f"bf16, FSDP2, gradient_checkpointing={train.gradient_checkpointing!r}, torch_compile={train.torch_compile!r}")
    print(f"tokens/s (median of steps 6-{len(records)}, synchronized): {tokens_per_s:,.0f}; "
          f"MFU {f'{mfu:.1%}' if mfu is not None else 'unknown (no peak for this device)'}; "
          f"peak memory {peak_memory:.1f} GiB per GPU")
    print(json.dumps({"params": params, "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_memory_gib": peak_memory,
                      "steps": len(records),
                      "checkpointing": train.gradient_checkpointing, "compile": train.torch_compile, "batch": args.batch, "seq": args.seq}))


if __name__ == "__main__":
    main()
