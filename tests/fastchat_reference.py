"""FastChat's `train.py` `preprocess` for the vicuna_v1.1 template, re-expressed here as the yardstick
for labtune's loss masks (same prompt string, same per-turn length arithmetic, same `-2` offset)."""

from __future__ import annotations

IGNORE_TOKEN_ID = -100
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def vicuna_prompt(source: list[dict[str, str]]) -> str:
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    if roles[source[0]["from"]] != "USER":
        source = source[1:]
    prompt, seps = SYSTEM + " ", [" ", "</s>"]
    for j, sentence in enumerate(source):
        role = roles[sentence["from"]]
        assert role == ("USER", "ASSISTANT")[j % 2]
        prompt += role + ": " + sentence["value"] + seps[j % 2]
    return prompt


def preprocess(sources: list[list[dict[str, str]]], tokenizer, max_length: int):
    """(input_ids, targets), padded to max_length, as FastChat computes them."""
    conversations = [vicuna_prompt(s) for s in sources]
    input_ids = tokenizer(conversations, return_tensors="pt", padding="max_length", max_length=max_length,
                          truncation=True).input_ids
    targets = input_ids.clone()
    sep = " ASSISTANT: "
    legacy = getattr(tokenizer, "legacy", True)
    for conversation, target in zip(conversations, targets):
        total_len = int(target.ne(tokenizer.pad_token_id).sum())
        turns = conversation.split("</s>")
        cur_len = 1
        target[:cur_len] = IGNORE_TOKEN_ID
        for i, turn in enumerate(turns):
            if turn == "":
                break
            turn_len = len(tokenizer(turn).input_ids)
            parts = turn.split(sep)
            if len(parts) != 2:
                break
            parts[0] += sep
            instruction_len = len(tokenizer(parts[0]).input_ids) - 2
            if i != 0 and not legacy:
                instruction_len -= 1
            target[cur_len:cur_len + instruction_len] = IGNORE_TOKEN_ID
            cur_len += turn_len
            if i != 0 and not legacy:
                cur_len -= 1
        target[cur_len:] = IGNORE_TOKEN_ID
        if cur_len < max_length and cur_len != total_len:
            target[:] = IGNORE_TOKEN_ID  # FastChat's "tokenization mismatch": the whole example is ignored
    return input_ids, targets
