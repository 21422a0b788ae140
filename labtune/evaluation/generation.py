"""Batched greedy generation and perplexity with transformers: the evaluate stage's answers,
`labtune ask` and `labtune chat`.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple


def load_model(model_dir: Path, bf16: bool = False, attn_implementation: str | None = None, gpu: bool = False
               ) -> tuple[Any, Any]:
    """The model and tokenizer, in fp32, or in bf16 when asked and the CPU computes bf16 natively
    (AVX512-BF16/AMX): the demo's 105 prompts then take 5 s instead of 13, with notes 14 s
    instead of 38, and the same answers but one in 210. With `gpu`, on the GPU where there is one
    (bf16 there too when asked)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from labtune.precision import native_bf16

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if bf16 and native_bf16() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    if gpu and torch.cuda.is_available():  # the synthesize stage's generator on the GPU pool; else the CPU
        model.to("cuda")
    model.eval()
    return model, tokenizer


class Sampling:
    """Answers drawn from the model's distribution (softmax of the logits over `temperature`), seeded:
    the same prompts, batches and seed draw the same answers."""

    def __init__(self, temperature: float = 1.0, seed: int = 0):
        import torch

        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)


class Generated(NamedTuple):
    """Greedy answers, the tokens generated in all, and which answers stopped at the token limit
    without the end-of-turn token (cut short)."""

    answers: list[str]
    tokens: int
    truncated: list[bool]


# Prompts that open with this many identical tokens (the same retrieved note before different
# questions) share one pass over their opening; below it the extra pass is not worth it.
SHARED_PREFIX_MIN = 32


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prompt_batches(rendered: list[list[int]], batch_size: int, share: bool = True) -> list[list[list[int]]]:
    """Prompt indices in batches of at most batch_size, each batch a list of groups whose prompts
    open with the same tokens: prompts that share SHARED_PREFIX_MIN tokens more than all prompts
    share (the same retrieved note after the same system turn) form a group, and the others form
    one group when what all share is that long (a system prompt), else stand alone. A group may be
    split across batches; groups are taken shortest first, so a batch holds prompts of similar
    length (a retrieved note makes some prompts ten times longer than others). share=False: every
    prompt alone."""
    order = sorted(range(len(rendered)), key=lambda i: rendered[i])
    everyone = _common_prefix(rendered[order[0]], rendered[order[-1]]) if order else 0
    groups: list[list[int]] = []
    for i in order:
        common = _common_prefix(rendered[groups[-1][0]], rendered[i]) if share and groups else 0
        # and at least half of each: prompts that share a header but not the note after it would pad every row
        # of the batch with the unshared rest (the notes' system turn: 64 s against 26 s for the demo's questions)
        if common >= everyone + SHARED_PREFIX_MIN and 2 * common >= max(len(rendered[groups[-1][0]]), len(rendered[i])):
            groups[-1].append(i)
        else:
            groups.append([i])
    alone = sorted((g[0] for g in groups if len(g) == 1), key=lambda i: (len(rendered[i]), i))
    if share and everyone >= SHARED_PREFIX_MIN and alone:
        groups = [g for g in groups if len(g) > 1] + [alone]
    groups.sort(key=lambda g: (max(len(rendered[i]) for i in g), min(g)))
    batches: list[list[list[int]]] = [[]]
    for group in groups:
        while group:
            room = batch_size - sum(len(g) for g in batches[-1])
            batches[-1].append(group[:room])
            group = group[room:]
            if room <= len(batches[-1][-1]):
                batches.append([])
    return [b for b in batches if b]


def _padded(rows: list[list[int]], pad_id: int, device: Any = None) -> tuple[Any, Any]:
    """Left-padded ids and their attention mask (on the model's device)."""
    import torch

    width = max(len(r) for r in rows)
    return (torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device),
            torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device))


def _reserved_cache(model: Any, capacity: int) -> Any:
    """A key/value cache whose full-attention layers write into tensors sized for the whole answer
    up front: transformers' DynamicCache grows by concatenation, copying every layer's cache at
    every token (a third of decoding time on a CPU). None where this transformers lacks the layer
    API (the model then makes its own cache)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return None

    class ReservedLayer(DynamicLayer):
        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.length, self.key_room, self.value_room = 0, None, None
            end = self.length + key_states.shape[-2]
            if self.key_room is None or end > self.key_room.shape[-2]:
                room = max(end, self.length + capacity)
                self.key_room = _grown(self.key_room, key_states, self.length, room)
                self.value_room = _grown(self.value_room, value_states, self.length, room)
            self.key_room[..., self.length:end, :] = key_states
            self.value_room[..., self.length:end, :] = value_states
            self.length = end
            self.keys, self.values = self.key_room[..., :end, :], self.value_room[..., :end, :]
            return self.keys, self.values

        def batch_select_indices(self, indices: Any) -> None:
            if self.get_seq_length() > 0:
                self.key_room, self.value_room = self.key_room[indices], self.value_room[indices]
                self.keys, self.values = self.key_room[..., :self.length, :], self.value_room[..., :self.length, :]

    cache = DynamicCache(config=model.config)
    if not cache.layers:
        return None
    cache.layers = [ReservedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _grown(room: Any, states: Any, length: int, size: int) -> Any:
    grown = states.new_empty((*states.shape[:-2], size, states.shape[-1]))
    if room is not None:
        grown[..., :length, :] = room[..., :length, :]
    return grown


def _next_tokens(logits: Any, sampling: Sampling | None) -> Any:
    """The argmax (greedy), or with `sampling` a draw from softmax(logits / temperature)."""
    import torch

    if sampling is None:
        return logits.argmax(-1)
    # drawn on the CPU, where the seeded generator lives: the same draws on a GPU
    probabilities = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    return torch.multinomial(probabilities, 1, generator=sampling.generator).squeeze(-1).to(logits.device)


def _decode(model: Any, cache_name: str, input_ids: Any, attention_mask: Any, cache: Any, max_new_tokens: int,
            stops: list[int], sampling: Sampling | None = None) -> list[list[int]]:
    """Greedy decoding (or sampling) from a prompt batch (its cache, if any, holding what came before input_ids).
    Rows that have produced an end-of-turn token leave the batch, their cache rows dropped, once
    they are a quarter of it (each drop copies the cache): a batch then costs the rows still
    answering, not every row until the longest answer ends."""
    import torch

    answers: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    device = input_ids.device
    rows = torch.arange(input_ids.shape[0], device=device)
    # positions count real tokens only, so a row reads as its prompt alone would
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
    stop_ids = torch.tensor(stops, device=device)
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{cache_name: cache})
        position = positions[:, -1]
        going = torch.ones(len(rows), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = _next_tokens(output.logits[:, -1], sampling)
            for row, t in zip(rows[going].tolist(), token[going].tolist()):
                answers[row].append(t)
            going &= ~torch.isin(token, stop_ids)
            if step == max_new_tokens - 1 or not going.any():
                break
            cache = output[cache_name]
            if 4 * int((~going).sum()) >= len(rows):
                keep = going.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows, token, attention_mask, position, going = (rows[keep], token[keep], attention_mask[keep],
                                                                position[keep], going[keep])
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
            position = position + 1
            output = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position[:, None],
                           use_cache=True, **{cache_name: cache})
    return answers


def _generate_batch(model: Any, groups: list[list[list[int]]], max_new_tokens: int, pad_id: int,
                    stops: list[int], sampling: Sampling | None = None) -> list[list[int]]:
    """Greedy continuations of the prompts of one batch, in order, groups flattened. A group's
    shared opening is computed once and its key/value cache copied to each member; each row then
    reads [pad][opening][pad][rest of the prompt], the pads masked and positions counted over real
    tokens only, so every answer is the one the prompt alone gets, with the prefill cut from
    (prompts x longest prompt) to (groups x longest opening + prompts x longest rest)."""
    import torch

    # transformers 5.x renamed past_key_values to cache (the old name still works, with a warning)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prompts = [p for group in groups for p in group]
    device = getattr(model, "device", None)
    if all(len(group) == 1 for group in groups):
        input_ids, attention_mask = _padded(prompts, pad_id, device)
        cache = _reserved_cache(model, input_ids.shape[1] + max_new_tokens)
        return _decode(model, cache_name, input_ids, attention_mask, cache, max_new_tokens, stops, sampling)
    # an opening never takes a prompt's last token: the first answer token is predicted from it
    openings = [min(min(_common_prefix(group[0], p) for p in group), min(len(p) for p in group) - 1)
                for group in groups]
    heads, head_mask = _padded([group[0][:n] for group, n in zip(groups, openings)], pad_id, device)
    rests, rest_mask = _padded([p[n:] for group, n in zip(groups, openings) for p in group], pad_id, device)
    member_of = torch.tensor([g for g, group in enumerate(groups) for _ in group], device=device)
    cache = _reserved_cache(model, heads.shape[1] + rests.shape[1] + max_new_tokens)
    with torch.no_grad():
        cache = model(input_ids=heads, attention_mask=head_mask, position_ids=(head_mask.cumsum(-1) - 1).clamp(min=0),
                      use_cache=True, logits_to_keep=1, **{cache_name: cache})[cache_name]
    cache.batch_select_indices(member_of)
    attention_mask = torch.cat([head_mask[member_of], rest_mask], dim=1)
    return _decode(model, cache_name, rests, attention_mask, cache, max_new_tokens, stops, sampling)


def generate(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], max_new_tokens: int, batch_size: int,
             template: str = "auto", on_batch: Callable[[int], None] | None = None, share_prefixes: bool = True,
             sampling: Sampling | None = None) -> Generated:
    """Greedy answers, batch_size conversations at a time (prompt_batches), each prompt rendered
    with the training chat template and ending where the assistant's turn begins; the answers come
    back in the order asked. share_prefixes=False: every prompt's prefill in full (bench/eval.py)."""
    from labtune.data.chat import conversation_prompt_ids, stop_token_ids

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)
    rendered = [conversation_prompt_ids(tokenizer, c, template) for c in conversations]
    answers: list[str] = [""] * len(rendered)
    truncated: list[bool] = [False] * len(rendered)
    generated = 0
    for batch in prompt_batches(rendered, batch_size, share_prefixes):
        chosen = [i for group in batch for i in group]
        rows = _generate_batch(model, [[rendered[i] for i in group] for group in batch], max_new_tokens, pad_id, stops,
                               sampling)
        for index, tokens in zip(chosen, rows):
            stop = next((i for i, t in enumerate(tokens) if t in stops), None)
            length = len(tokens) if stop is None else stop + 1
            generated += length
            truncated[index] = stop is None
            answers[index] = tokenizer.decode(tokens[:length], skip_special_tokens=True).strip()
        if on_batch:
            on_batch(len(chosen))
    return Generated(answers, generated, truncated)


def ask(model: Any, tokenizer: Any, questions: list[str], max_new_tokens: int, batch_size: int, template: str = "auto",
        system: str | None = None, on_batch: Callable[[int], None] | None = None, sampling: Sampling | None = None,
        notes: list[str] | None = None) -> Generated:
    """Greedy (or, with `sampling`, sampled) answers to single questions; `system` is the system
    turn training used (None: the template's default); `notes`, one per question, the notes
    retrieval found for it (NotesIndex.context), which follow `system` in the system turn."""
    from labtune.data.raft import notes_system

    conversations = [with_system([{"role": "user", "content": q}],
                                 notes_system(system, notes[i]) if notes is not None else system)
                     for i, q in enumerate(questions)]
    return generate(model, tokenizer, conversations, max_new_tokens, batch_size, template, on_batch, sampling=sampling)


# `evaluation.max_new_tokens: auto` and `labtune ask` without a limit: the longest answer training
# taught plus a quarter (at least 16 tokens), so that no answer the model learned is cut short
# while a model that never stops is still stopped; without a known training run, this many.
DEFAULT_MAX_NEW_TOKENS = 128
AUTO_MARGIN_FRACTION, AUTO_MARGIN_MIN = 0.25, 16


def longest_answer_tokens(labels: Iterable[list[int]]) -> int:
    """The longest run of label tokens in tokenized examples: one assistant turn, its end-of-turn
    token included, in tokens of the model's tokenizer."""
    from labtune.data.chat import IGNORE_INDEX

    longest = 0
    for row in labels:
        run = 0
        for label in row:
            run = run + 1 if label != IGNORE_INDEX else 0
            longest = max(longest, run)
    return longest


def auto_max_new_tokens(longest_answer: int | None) -> int:
    """The `auto` answer budget for a training run whose longest answer is `longest_answer` tokens."""
    if not longest_answer:
        return DEFAULT_MAX_NEW_TOKENS
    return longest_answer + max(AUTO_MARGIN_MIN, math.ceil(longest_answer * AUTO_MARGIN_FRACTION))


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    return messages if system is None else [{"role": "system", "content": system}, *messages]


def mean_loss(model: Any, examples: list[dict[str, list[int]]], batch_size: int = 8, max_tokens: int = 8192
              ) -> dict[str, float]:
    """Mean cross-entropy per label token over tokenized examples (input_ids, labels), and its
    perplexity. Batches hold at most `batch_size` examples and `max_tokens` padded tokens, and the
    output layer runs on the label positions only: long reference answers never hold a
    (batch x length x vocabulary) tensor of logits."""
    import torch

    from labtune.data.chat import IGNORE_INDEX

    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # little padding
    batches: list[list[int]] = []
    for i in order:
        width = len(examples[i]["input_ids"])  # the longest so far: sorted by length
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * width <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    for chosen in batches:
        batch = [examples[i] for i in chosen]
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            n = len(example["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.as_tensor(example["input_ids"]), torch.as_tensor(example["labels"]), 1
        shifted = labels[:, 1:]
        wanted = shifted != IGNORE_INDEX
        with torch.no_grad():
            hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][wanted]
            logits = head(hidden).float()
        total += float(torch.nn.functional.cross_entropy(logits, shifted[wanted], reduction="sum"))
        count += int(wanted.sum())
    if count == 0:
        return {"loss": None, "perplexity": None, "tokens": 0}
    loss = total / count
    return {"loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 50.0)), 4), "tokens": count}


def encode_answer(tokenizer: Any, question: str, answer: str, template: str = "auto", system: str | None = None
                  ) -> dict[str, list[int]]:
    """A question-answer conversation tokenized as training tokenizes it (the system turn training
    used, when given), with loss on the answer only: for perplexity on reference answers."""
    from labtune.data.chat import encode_conversation

    turns = ([{"from": "system", "value": system}] if system is not None else []) + [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer or " "}]
    return encode_conversation(tokenizer, turns, template=template)
