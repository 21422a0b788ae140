"""Delta merge: labtune's streamed `merge-delta` vs FastChat's in-memory `apply_delta`.

    python bench/delta.py [--workdir DIR] [--layers 16] [--keep]

Builds a synthetic LLaMA-shaped model of about 2 GB in fp16 (hidden 2048, 16 layers, vocab 32000),
split into 1 GB safetensors shards, and a delta of the same shape. Then, each in its own child
process, runs
  - labtune: `labtune merge-delta --base B --delta D --out O` (streamed, manifest included), and
  - the baseline, what FastChat's `apply_delta` does: load base and delta fully with transformers
    in fp16, add every delta parameter into the base in place, `save_pretrained` the result;
checks both outputs hold the same tensors bit for bit, and prints wall time and peak RSS of each
and the ratios (targets: RSS <= 0.25x, wall time <= 1.0x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BASELINE = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
base_path, delta_path, target_path = sys.argv[1:4]
base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float16, low_cpu_mem_usage=True)
delta = AutoModelForCausalLM.from_pretrained(delta_path, dtype=torch.float16, low_cpu_mem_usage=True)
delta_tokenizer = AutoTokenizer.from_pretrained(delta_path)
delta_state = delta.state_dict()
for name, param in base.state_dict().items():
    assert name in delta_state
    param.data += delta_state[name]
base.save_pretrained(target_path)
delta_tokenizer.save_pretrained(target_path)
"""

MAKE_MODEL = r"""
import json, shutil, sys, torch
from pathlib import Path
from labtune.models.tensorfiles import ShardedWriter, TensorInfo
out, seed, layers, tokenizer_dir = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
hidden, inter, vocab, heads = 2048, 5632, 32000, 16
shapes = [("model.embed_tokens.weight", (vocab, hidden))]
for i in range(layers):
    p = f"model.layers.{i}."
    shapes += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (hidden, hidden)),
               (p + "self_attn.v_proj.weight", (hidden, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
               (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
               (p + "mlp.down_proj.weight", (hidden, inter)), (p + "input_layernorm.weight", (hidden,)),
               (p + "post_attention_layernorm.weight", (hidden,))]
shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
writer = ShardedWriter(out, [TensorInfo(n, "float16", s) for n, s in shapes], max_shard_bytes=10**9)
generator = torch.Generator().manual_seed(seed)
for name, shape in shapes:
    writer.write(name, (torch.randn(shape, generator=generator) * 0.02).half())
writer.close()
config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
          "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
          "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 2048,
          "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "dtype": "float16", "bos_token_id": 1, "eos_token_id": 2}
(out / "config.json").write_text(json.dumps(config, indent=2))
for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copyfile(tokenizer_dir / name, out / name)
"""


def measured(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process (and what it waited for)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def same_tensors(a: Path, b: Path) -> tuple[int, int]:
    """(tensors compared, tensors that differ), read block by block."""
    import torch

    from labtune.models.tensorfiles import Checkpoint, row_blocks

    compared = differ = 0
    with Checkpoint(a) as left, Checkpoint(b) as right:
        if set(left.tensors) != set(right.tensors):
            sys.exit(f"outputs hold different tensor names: {sorted(set(left.tensors) ^ set(right.tensors))[:5]}")
        for name, info in left.tensors.items():
            compared += 1
            differ += any(not torch.equal(left.read(name, s, e), right.read(name, s, e)) for s, e in row_blocks(info))
    return compared, differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where the ~8 GB of models go (default: a temp dir)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the models afterwards")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="labtune-bench-delta-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from labtune.models.tiny import make_tiny_llama

        tokenizer = make_tiny_llama(work / "tokenizer-source")
        started = time.perf_counter()
        for name, seed in (("base", 0), ("delta", 1)):
            subprocess.run([sys.executable, "-c", MAKE_MODEL, str(work / name), str(seed), str(args.layers),
                            str(tokenizer)], cwd=REPO, check=True)
        size = sum(p.stat().st_size for p in (work / "base").glob("*.safetensors"))
        shards = len(list((work / "base").glob("*.safetensors")))
        print(f"synthetic model: {size / 1e9:.2f} GB fp16 in {shards} shards, {args.layers} layers "
              f"(built in {time.perf_counter() - started:.0f}s); delta of the same shape")

        ours = measured([sys.executable, "-m", "labtune.cli", "merge-delta", "--base", str(work / "base"),
                         "--delta", str(work / "delta"), "--out", str(work / "labtune-out")])
        baseline = measured([sys.executable, "-c", BASELINE, str(work / "base"), str(work / "delta"),
                             str(work / "baseline-out")])
        compared, differ = same_tensors(work / "labtune-out", work / "baseline-out")
        print(f"outputs: {compared} tensors compared, {differ} differ")
        print(f"{'':34}{'wall s':>9}{'peak RSS GB':>13}")
        print(f"{'baseline (FastChat apply_delta)':34}{baseline[0]:9.1f}{baseline[1]:13.2f}")
        print(f"{'labtune merge-delta (streamed)':34}{ours[0]:9.1f}{ours[1]:13.2f}")
        print(f"ratio labtune/baseline: wall {ours[0] / baseline[0]:.2f}x (target <= 1.0), "
              f"peak RSS {ours[1] / baseline[1]:.2f}x (target <= 0.25)")
        print(json.dumps({"model_gb": round(size / 1e9, 2), "baseline": {"seconds": round(baseline[0], 1), "rss_gb": round(baseline[1], 2)},
                          "labtune": {"seconds": round(ours[0], 1), "rss_gb": round(ours[1], 2)},
                          "wall_ratio": round(ours[0] / baseline[0], 3), "rss_ratio": round(ours[1] / baseline[1], 3),
                          "tensors_differ": differ}))
        if differ:
            sys.exit("the two merges disagree")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
