"""ShareGPT conversations -> tokenized, loss-masked examples, batched and multi-process.

`datasets.map` runs `encode_batch` over batches of 1,000 conversations with the fast tokenizer
(one tokenizer call per batch; `num_proc` processes). A conversation longer than
model_max_length is split between question-answer pairs, FastChat's `split_long_conversation`
semantics (the parts are `<id>_<first turn>`), with exact token counts from the real template;
a single pair that is still too long is dropped and counted, never cut mid-answer. Output: a
`datasets` folder per split (input_ids, labels, length, id) and a report with a token-length
histogram.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from labtune.data.chat import IGNORE_INDEX, encode_texts, render, resolve_template, to_messages

BATCH = 1000
KEPT, TOO_LONG, UNLABELLED = 0, 1, 2


def _render_all(tokenizer: Any, conversations: list[list[dict[str, str]]], template: str):
    rendered = [render(tokenizer, to_messages(c), template) for c in conversations]
    return [t for t, _ in rendered], [s for _, s in rendered]


def split_conversation(tokenizer: Any, record: dict[str, Any], template: str, max_length: int
                       ) -> tuple[list[dict[str, Any]], int]:
    """Parts of a too-long conversation, cut between question-answer pairs so each part fits;
    returns (encoded parts, pairs dropped because one pair alone is too long)."""
    turns = record["conversations"]
    system = turns[:1] if turns and turns[0]["from"] == "system" else []
    body = turns[len(system):]
    pairs = [body[i:i + 2] for i in range(0, len(body), 2)]
    parts, dropped, start = [], 0, 0

    def encoded(first: int, last: int) -> dict[str, list[int]]:
        chunk = system + [t for pair in pairs[first:last] for t in pair]
        texts, spans = _render_all(tokenizer, [chunk], template)
        return encode_texts(tokenizer, texts, spans, template)[0]

    while start < len(pairs):
        best, end = None, start
        while end < len(pairs):
            candidate = encoded(start, end + 1)
            if len(candidate["input_ids"]) > max_length:
                break
            best, end = candidate, end + 1
        if best is None:  # this pair alone does not fit
            dropped += 1
            start += 1
            continue
        parts.append({"id": f"{record['id']}_{len(system) + 2 * start}", **best})
        start = end
    return parts, dropped


def encode_batch(batch: dict[str, list], tokenizer: Any, template: str, max_length: int) -> dict[str, list]:
    """datasets.map function: a batch of {id, conversations} -> {id, input_ids, labels, length,
    parts, dropped_pairs}; a long conversation may give several rows, or none."""
    texts, spans = _render_all(tokenizer, batch["conversations"], template)
    encoded = encode_texts(tokenizer, texts, spans, template)
    out: dict[str, list] = {"id": [], "input_ids": [], "labels": [], "length": [], "parts": [], "dropped_pairs": [],
                            "status": []}
    for record_id, conversation, example in zip(batch["id"], batch["conversations"], encoded):
        if len(example["input_ids"]) <= max_length:
            rows, dropped = [{"id": record_id, **example}], 0
        else:
            rows, dropped = split_conversation(tokenizer, {"id": record_id, "conversations": conversation}, template, max_length)
        if not rows:  # nothing left to learn from: keep a row only to count the drop
            rows = [{"id": record_id, "input_ids": [], "labels": []}]
        for index, row in enumerate(rows):  # counts ride on a conversation's first row only
            out["id"].append(row["id"])
            out["input_ids"].append(row["input_ids"])
            out["labels"].append(row["labels"])
            out["length"].append(len(row["input_ids"]))
            out["parts"].append((len(rows) if row["input_ids"] else 0) if index == 0 else 0)
            out["dropped_pairs"].append(dropped if index == 0 else 0)
            out["status"].append(TOO_LONG if not row["input_ids"] else
                                 KEPT if any(x != IGNORE_INDEX for x in row["labels"]) else UNLABELLED)
    return out


def default_num_proc(records: int) -> int:
    """Processes pay off from a few thousand conversations on."""
    return max(1, min(os.cpu_count() or 1, 8, records // 2000))


def tokenize_split(records: list[dict[str, Any]], tokenizer: Any, template: str, max_length: int,
                   num_proc: int | None, out: Path) -> dict[str, Any]:
    """Tokenize one split into a datasets folder at out; returns its counts and histogram."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    template = resolve_template(tokenizer, template)
    procs = num_proc or default_num_proc(len(records))
    # datasets would fingerprint every step by pickling its arguments with dill (slow with a big
    # tokenizer, and broken for some pyarrow/dill/Python combinations); nothing here is cached by
    # datasets, so each step gets a fingerprint of its own, derived from the input.
    fingerprint = hashlib.sha256(json.dumps([template, max_length, records], sort_keys=True).encode()).hexdigest()[:16]
    if not records:
        empty = Dataset(_features().arrow_schema.empty_table(), fingerprint=fingerprint)
        empty.save_to_disk(str(out))
        return {"conversations": 0, "examples": 0, "split_conversations": 0, "dropped_too_long": 0, "dropped_pairs": 0,
                "dropped_unlabelled": 0, "tokens": 0, "max_length": 0, "histogram": histogram([], max_length),
                "template": template, "num_proc": 0}
    import pyarrow as pa

    table = pa.table({"id": [r["id"] for r in records],
                      "conversations": [[{"from": t["from"], "value": t["value"]} for t in r["conversations"]]
                                        for r in records]})
    dataset = Dataset(table, fingerprint=f"{fingerprint}-in")
    if procs > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # parallel across processes instead
    from datasets import Features, Value

    mapped = dataset.map(encode_batch, batched=True, batch_size=BATCH,
                         num_proc=procs if procs > 1 and len(records) > BATCH else None,
                         remove_columns=dataset.column_names,
                         features=Features({**_features(), "parts": Value("int32"), "dropped_pairs": Value("int32"),
                                            "status": Value("int8")}),
                         fn_kwargs={"tokenizer": tokenizer, "template": template, "max_length": max_length},
                         new_fingerprint=f"{fingerprint}-map")
    status = mapped["status"][:]
    kept = mapped.filter(lambda batch: [s == KEPT for s in batch], input_columns=["status"], batched=True,
                         batch_size=10_000, new_fingerprint=f"{fingerprint}-kept")
    kept = kept.remove_columns(["parts", "dropped_pairs", "status"], new_fingerprint=f"{fingerprint}-out")
    kept.save_to_disk(str(out))
    lengths = kept["length"][:]
    return {
        "conversations": len(records),
        "examples": len(kept),
        "split_conversations": sum(1 for p in mapped["parts"][:] if p > 1),
        "dropped_too_long": status.count(TOO_LONG),
        "dropped_pairs": sum(mapped["dropped_pairs"][:]),
        "dropped_unlabelled": status.count(UNLABELLED),
        "tokens": sum(lengths),
        "max_length": max(lengths, default=0),
        "histogram": histogram(lengths, max_length),
        "template": template,
        "num_proc": procs,
    }


def _features():
    from datasets import Features, Sequence, Value

    return Features({"id": Value("string"), "input_ids": Sequence(Value("int32")),
                     "labels": Sequence(Value("int32")), "length": Value("int32")})


def histogram(lengths: list[int], max_length: int) -> list[dict[str, Any]]:
    """Counts per token-length bin: powers of two up to model_max_length."""
    edges = [0]
    while edges[-1] < max_length:
        edges.append(min(max_length, max(64, edges[-1] * 2)))
    rows = []
    for low, high in zip(edges, edges[1:]):
        count = sum(1 for n in lengths if low < n <= high)
        rows.append({"tokens": f"{low + 1}-{high}", "examples": count})
    return rows
