"""FastChat's own `preprocess` (fschat, installed without its dependencies) as the yardstick for
labtune's vicuna_v1.1 loss masks, and LLaMA's slow tokenizer as transformers 4 defined it.

transformers 5 dropped the slow `LlamaTokenizer`; `SlowLlamaTokenizer` puts back its two
differences from the SentencePiece base that transformers 5 keeps: the BOS token in front and,
with `legacy=False`, a prefix space added before encoding (removed again before a special token).
"""

from __future__ import annotations

from pathlib import Path

from transformers.tokenization_utils_sentencepiece import SPIECE_UNDERLINE, SentencePieceBackend


class SlowLlamaTokenizer(SentencePieceBackend):
    def tokenize(self, text, **kwargs):
        if self.legacy or not text:
            return super().tokenize(text, **kwargs)
        tokens = super().tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), **kwargs)
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def build_inputs_with_special_tokens(self, first, second=None):
        return [self.bos_token_id] + first + ([self.bos_token_id] + second if second else [])


def slow_tokenizer(model_dir: Path, max_length: int) -> SlowLlamaTokenizer:
    tokenizer = SlowLlamaTokenizer(vocab_file=str(model_dir / "tokenizer.model"), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", legacy=False, model_max_length=max_length)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.unk_token, "right"
    return tokenizer


def fastchat_preprocess(conversations: list[list[dict[str, str]]], tokenizer):
    """(input_ids, targets) from FastChat's train.py, padded to tokenizer.model_max_length."""
    from fastchat.train.train import preprocess

    result = preprocess(conversations, tokenizer)
    return result["input_ids"], result["labels"]
