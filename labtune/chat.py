"""Chat formatting and loss masks, shared by training and evaluation.

A model's own chat template is used when its tokenizer has one (SmolLM2: ChatML); otherwise
FastChat's vicuna_v1.1 template. Labels are -100 everywhere except the assistant turns and
their end-of-turn token. Training and generation build prompts with the same functions, so the
model is asked questions exactly the way it was taught.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_messages(conversation: list[dict[str, str]]) -> list[dict[str, str]]:
    """ShareGPT turns ({from, value}) -> OpenAI-style messages ({role, content})."""
    messages = []
    for turn in conversation:
        if "role" in turn:
            messages.append({"role": ROLE_OF[turn["role"]], "content": turn["content"]})
        else:
            messages.append({"role": ROLE_OF[turn["from"]], "content": turn["value"]})
    return messages


def template_name(tokenizer: Any) -> str:
    return "chat_template" if getattr(tokenizer, "chat_template", None) else "vicuna_v1.1"


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _vicuna_segments(messages: list[dict[str, str]], add_generation_prompt: bool) -> list[tuple[list[int] | str, bool]]:
    """(text or ids, is_assistant) pieces of FastChat's vicuna_v1.1 rendering:
    `SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:`."""
    system = VICUNA_SYSTEM
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    segments: list[tuple[list[int] | str, bool]] = []
    prompt = system + " "
    for message in messages:
        if message["role"] == "user":
            prompt += f"USER: {message['content']} ASSISTANT:"
        else:
            segments.append((prompt, False))
            segments.append((" " + message["content"], True))
            segments.append(("</s>", True))
            prompt = ""
    if add_generation_prompt and prompt:
        segments.append((prompt, False))
    return segments


def encode_conversation(tokenizer: Any, conversation: list[dict[str, str]], max_length: int) -> dict[str, list[int]]:
    """input_ids and labels for one conversation; labels mask everything but assistant turns."""
    messages = to_messages(conversation)
    if template_name(tokenizer) == "chat_template":
        input_ids, labels = _encode_with_template(tokenizer, messages)
    else:
        input_ids, labels = _encode_vicuna(tokenizer, messages)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def _encode_vicuna(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    input_ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels: list[int] = [IGNORE_INDEX] * len(input_ids)
    for text, is_assistant in _vicuna_segments(messages, add_generation_prompt=False):
        ids = [tokenizer.eos_token_id] if text == "</s>" else _ids(tokenizer, text)
        input_ids += ids
        labels += ids if is_assistant else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def _encode_with_template(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    # Templates without {% generation %} markers (SmolLM2's ChatML) give no assistant mask, so
    # each assistant span is found as the difference between two rendered prefixes.
    full = _template_ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_template_ids(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(_template_ids(tokenizer, messages[: i + 1], add_generation_prompt=False))
        labels[start:end] = full[start:end]
    return full, labels


def prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """Token ids of a one-question prompt, ending where the assistant's answer begins."""
    messages = [{"role": "user", "content": question}]
    if template_name(tokenizer) == "chat_template":
        return _template_ids(tokenizer, messages, add_generation_prompt=True)
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for text, _ in _vicuna_segments(messages, add_generation_prompt=True):
        ids += _ids(tokenizer, text)
    return ids


def stop_token_ids(tokenizer: Any) -> list[int]:
    """End-of-turn tokens: eos, and ChatML's <|im_end|> when the vocabulary has it."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        ids.add(im_end)
    return sorted(ids)
