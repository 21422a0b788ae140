"""GPU training throughput of labtune's FSDP2 worker: tokens/s, MFU and memory on a random LLaMA.

    python bench/train_mfu.py [--shape 1b|3b|8b] [--layers N] [--seq 2048] [--batch 8] [--steps 30]
                              [--nproc 1] [--checkpointing default|none|selective|full]
                              [--compile auto|on|off] [--offload]

Builds a random LLaMA of the shape (1b: TinyLlama-1.1B, hidden 2048, 22 layers, 32 heads, 4 KV
heads, vocab 32000; 3b: Llama-3.2-3B, 3072, 28, 24, 8, 128256, tied; 8b: Llama-3.1-8B, 4096, 32,
32, 8, 128256) and a synthetic tokenized data set of full-length sequences, then runs
`torchrun -m labtune.training.worker` with bf16 mixed precision and FSDP2, and otherwise a recipe's
default settings unless told: torch_compile auto, gradient_checkpointing auto (resolved by the
train stage's memory plan, labtune/training/memory.py, printed with its estimate beside the measured peak).
Reports the median over the steps after warm-up of what the worker logs: tokens/s and MFU from
synchronized wall time (labtune/training/throughput.py: 6 x matmul parameters + 12 x layers x hidden x
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


SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def build_model(model_dir: Path, shape: dict, seq: int) -> int:
    """A random LLaMA of the shape, saved in bf16 as a downloaded checkpoint is, with a small
    tokenizer; returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from labtune.models.tiny import make_tiny_llama

    make_tiny_llama(model_dir)  # the tokenizer files; the weights are replaced below
    config = LlamaConfig(**shape, max_position_embeddings=seq, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init of 8B on a CPU takes minutes
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    del model
    return params


def build(work: Path, shape: dict, seq: int, examples: int) -> int:
    """The model and a synthetic tokenized data set of full-length sequences; returns the parameter count."""
    import torch
    from datasets import Dataset

    params = build_model(work / "model", shape, seq)
    generator = torch.Generator().manual_seed(0)
    vocab = shape["vocab_size"]
    ids = torch.randint(3, vocab, (examples, seq), generator=generator).tolist()
    import pyarrow as pa

    table = pa.table({"id": [str(i) for i in range(examples)], "input_ids": pa.array(ids, pa.list_(pa.int32())),
                      "labels": pa.array(ids, pa.list_(pa.int32())), "length": pa.array([seq] * examples, pa.int32())})
    Dataset(table, fingerprint="bench-train-mfu").save_to_disk(str(work / "tokens"))  # no dill hashing
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape has")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="per-device micro-batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=1)
    # the defaults are a recipe's defaults: what a user who names only the model, data and bf16 gets
    parser.add_argument("--checkpointing", choices=["default", "none", "selective", "full"], default="default",
                        help="train.gradient_checkpointing: the recipe default (auto: the least the memory needs), "
                             "none, selective (every 2nd layer), full")
    parser.add_argument("--offload", action="store_true", help="train.fsdp: full_shard auto_wrap offload (CPUOffloadPolicy)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="train.torch_compile: auto (the default: on for CUDA), on, off")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="labtune-bench-mfu-"))
    shape = dict(SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {}))
    params = build(work, shape, args.seq, args.steps * args.batch * args.nproc)
    from labtune.recipe import TrainConfig
    from labtune.store.backends import StoreSettings
    from labtune.training.worker_config import WorkerConfig

    settings = {}
    if args.checkpointing != "default":
        settings["gradient_checkpointing"] = {"none": False, "selective": "selective", "full": True}[args.checkpointing]
    if args.compile != "auto":
        settings["torch_compile"] = args.compile == "on"
    if args.offload:
        settings["fsdp"] = "full_shard auto_wrap offload"
    train = TrainConfig(num_train_epochs=1, per_device_train_batch_size=args.batch, learning_rate=1e-4, warmup_ratio=0.0,
                        lr_scheduler_type="constant", bf16=True, save_strategy="no", seed=0, **settings)
    # what the train stage does before it launches: resolve auto checkpointing, or fail with the numbers
    from labtune.training import memory

    dev = memory.devices(True, args.nproc, None)
    train, plan = memory.plan(train, args.nproc, args.nproc, memory.Shape.of_model_dir(work / "model", train),
                              lambda rows: memory.Batch(rows, args.seq, rows * args.seq), dev)
    print(f"memory plan: {plan.describe()} per GPU of {dev.per_rank / memory.GIB:.1f} GiB ({dev.name}); "
          f"gradient_checkpointing {train.gradient_checkpointing!r}", flush=True)
    WorkerConfig(model_dir=str(work / "model"), train_dir=str(work / "tokens"), output_dir=str(work / "out"),
                 checkpoint_dir=str(work / "checkpoints"), store=StoreSettings(str(work / "store")),
                 train=train).write(work / "config.json")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--master_port=29533",
               "-m", "labtune.training.worker", "--config", str(work / "config.json")]
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
    metrics = json.loads((work / "out" / "train_metrics.json").read_text())
    export_peak = max(metrics.get("export_peak_memory_gib") or [0.0])
    print(f"model: {params / 1e9:.2f}B parameters, sequence {args.seq}, micro-batch {args.batch} x {args.nproc} GPU(s), "
          f"bf16, FSDP2, gradient_checkpointing={train.gradient_checkpointing!r}, torch_compile={train.torch_compile!r}")
    print(f"tokens/s (median of steps 6-{len(records)}, synchronized): {tokens_per_s:,.0f}; "
          f"MFU {f'{mfu:.1%}' if mfu is not None else 'unknown (no peak for this device)'}; "
          f"peak memory {peak_memory:.1f} GiB per GPU (estimated {plan.device / memory.GIB:.1f}, with "
          f"{memory.CUDA_RUNTIME / memory.GIB:.1f} of CUDA runtime torch does not allocate); export peak {export_peak:.1f} GiB")
    print(json.dumps({"shape": args.shape, "params": params, "tokens_per_s": tokens_per_s, "mfu": mfu,
                      "peak_memory_gib": peak_memory, "estimated_gib": round(plan.device / memory.GIB, 2),
                      "export_peak_memory_gib": export_peak, "offload": args.offload,
                      "steps": len(records),
                      "checkpointing": train.gradient_checkpointing, "compile": train.torch_compile, "batch": args.batch, "seq": args.seq}))


if __name__ == "__main__":
    main()
