"""Chat formatting and loss masks, shared by tokenization and evaluation.

A conversation is rendered to one string, with the character spans of the assistant's answers,
and tokenized once with offsets; a token is a label when it overlaps an answer span, everything
else is -100. Templates:
- `vicuna_v1.1`, FastChat's: `SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>`,
  tokenized with BOS. The answer span starts at the space after `ASSISTANT:`, which makes the
  masks equal FastChat's `preprocess` (checked on FastChat's own dummy conversations).
- `tokenizer`: the model's own chat template (SmolLM2: ChatML). Each answer span is found as the
  difference between two rendered prefixes, and includes the end-of-turn token.
`auto` takes the tokenizer's template when it has one, else vicuna_v1.1. Prompts for evaluation
are built by the same functions, so the model is asked questions exactly the way it was taught.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100
TEMPLATES = ("auto", "vicuna_v1.1", "tokenizer")
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# vicuna_v1.1 as a Jinja chat template, for readers that render prompts themselves (a GGUF file
# for llama.cpp and Ollama): the same text `render` builds, BOS left to the tokenizer as here
VICUNA_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    '{%- else -%}{%- set system = "' + VICUNA_SYSTEM + '" -%}{%- endif -%}'
    "{{- system + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' + message['content'] + ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' + message['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class TemplateError(ValueError):
    """The tokenizer cannot render or mask conversations as asked."""


def to_messages(conversation: list[dict[str, str]]) -> list[dict[str, str]]:
    """ShareGPT turns ({from, value}) -> OpenAI-style messages ({role, content})."""
    messages = []
    for turn in conversation:
        if "role" in turn:
            messages.append({"role": ROLE_OF[turn["role"]], "content": turn["content"]})
        else:
            messages.append({"role": ROLE_OF[turn["from"]], "content": turn["value"]})
    return messages


def resolve_template(tokenizer: Any, template: str = "auto") -> str:
    if template not in TEMPLATES:
        raise TemplateError(f"chat template {template!r}: expected one of {TEMPLATES}")
    if template == "auto":
        return "tokenizer" if getattr(tokenizer, "chat_template", None) else "vicuna_v1.1"
    if template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise TemplateError("chat template 'tokenizer': this tokenizer has no chat template")
    return template


def _eos_text(tokenizer: Any) -> str:
    return tokenizer.eos_token or "</s>"


def render(tokenizer: Any, messages: list[dict[str, str]], template: str,
           add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """(text, assistant character spans) of a conversation in the resolved template."""
    if template == "vicuna_v1.1":
        system = VICUNA_SYSTEM
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        text, spans = system + " ", []
        for message in messages:
            if message["role"] == "user":
                text += f"USER: {message['content']} "
            else:
                text += "ASSISTANT:"
                start = len(text)
                text += f" {message['content']}{_eos_text(tokenizer)}"
                spans.append((start, len(text)))
        if add_generation_prompt:
            text += "ASSISTANT:"
        return text, spans
    full = _apply_template(tokenizer, messages, add_generation_prompt)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:i], True) if i else _apply_template(tokenizer, [], True)
        through = _apply_template(tokenizer, messages[: i + 1], False)
        if not full.startswith(through) or not through.startswith(before):
            raise TemplateError("the tokenizer's chat template does not render conversations prefix by prefix; "
                                "use data.chat_template: vicuna_v1.1")
        spans.append((len(before), len(through)))
    return full, spans


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def adds_special_tokens(template: str) -> bool:
    """vicuna_v1.1 text gets the tokenizer's BOS; a chat template writes its own special tokens."""
    return template == "vicuna_v1.1"


def labels_from_offsets(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """A token is a label when its (non-empty) character range overlaps an answer span."""
    import numpy as np

    if not input_ids:
        return []
    ids = np.asarray(input_ids)
    ranges = np.asarray(offsets).reshape(-1, 2)
    begin, end = ranges[:, 0], ranges[:, 1]
    inside = np.zeros(len(ids), dtype=bool)
    for start, stop in spans:
        inside |= (end > start) & (begin < stop)
    inside &= end > begin
    return np.where(inside, ids, IGNORE_INDEX).tolist()


def encode_texts(tokenizer: Any, texts: list[str], spans: list[list[tuple[int, int]]], template: str) -> list[dict[str, list[int]]]:
    """One batched tokenizer call for many rendered conversations; input_ids and labels each."""
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("a fast tokenizer (tokenizer.json) is needed for loss masks from offsets")
    encoded = tokenizer(texts, add_special_tokens=adds_special_tokens(template), return_offsets_mapping=True)
    return [{"input_ids": ids, "labels": labels_from_offsets(ids, offs, sp)}
            for ids, offs, sp in zip(encoded["input_ids"], encoded["offset_mapping"], spans)]


def encode_conversation(tokenizer: Any, conversation: list[dict[str, str]], max_length: int | None = None,
                        template: str = "auto") -> dict[str, list[int]]:
    """input_ids and labels for one conversation (cut at max_length when given)."""
    resolved = resolve_template(tokenizer, template)
    text, spans = render(tokenizer, to_messages(conversation), resolved)
    encoded = encode_texts(tokenizer, [text], [spans], resolved)[0]
    if max_length is not None:
        encoded = {k: v[:max_length] for k, v in encoded.items()}
    return encoded


def prompt_ids(tokenizer: Any, question: str, template: str = "auto") -> list[int]:
    """Token ids of a one-question prompt, ending where the assistant's answer begins."""
    return conversation_prompt_ids(tokenizer, [{"role": "user", "content": question}], template)


def conversation_prompt_ids(tokenizer: Any, messages: list[dict[str, str]], template: str = "auto") -> list[int]:
    """Token ids of a conversation so far (messages ending with the user's turn), ending where the
    assistant's next answer begins."""
    resolved = resolve_template(tokenizer, template)
    text, _ = render(tokenizer, messages, resolved, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=adds_special_tokens(resolved))["input_ids"]


def stop_token_ids(tokenizer: Any) -> list[int]:
    """End-of-turn tokens: eos, and ChatML's <|im_end|> when the vocabulary has it."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        ids.add(im_end)
    return sorted(ids)
