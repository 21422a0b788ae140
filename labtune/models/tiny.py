"""A tiny random LLaMA with a SentencePiece tokenizer trained on the spot, for CI and tests.

Everything is seeded, so the same spec gives the same model; it runs a whole pipeline in
seconds per stage on a CPU. It knows nothing: it exists to exercise the real code paths.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from labtune.recipe import TINY_DEFAULTS

_WORDS = (
    "the lab meeting presenter recorder topic attendees action items notes discussed results "
    "experiment protein model data training analysis figure paper draft review deadline poster "
    "sequencing microscopy cells assay pipeline cluster GPU python code bug fix plan next week "
    "who what when where why how presented recorded talked about agreed decided asked answered "
    "Monday Tuesday Wednesday Thursday Friday January February March April May June July August "
    "September October November December USER ASSISTANT SYSTEM chat assistant user helpful answer "
    "question a an and or of to in on at for with by from is was are were be been has have had"
).split()


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(3000):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.append(f"{rng.randint(1, 12)}/{rng.randint(1, 28)}/{rng.randint(2019, 2026)}")
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]))
    return lines


def _train_tokenizer(out: Path, params: dict[str, int]) -> int:
    """A SentencePiece BPE tokenizer trained as LLaMA's was, saved with its transformers config;
    returns its vocabulary size."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(params["seed"])),
        model_prefix=str(out / "tokenizer"),
        vocab_size=params["vocab_size"],
        model_type="bpe",
        byte_fallback=True,
        # LLaMA's own settings: text is not normalised and runs of spaces are kept, so the slow
        # (SentencePiece) and fast (tokenizers) forms give the same ids, as they do for LLaMA
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        num_threads=1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    vocab_size = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).get_piece_size()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": params["max_position_embeddings"],
        "legacy": False,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))
    return vocab_size


def make_tiny_llama(out_dir: str | Path, spec: dict[str, int] | None = None) -> Path:
    """Write a random LlamaForCausalLM (safetensors) and a LlamaTokenizer into out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    params = {**TINY_DEFAULTS, **(spec or {})}
    unknown = set(params) - set(TINY_DEFAULTS)
    if unknown:
        raise ValueError(f"base_model.tiny: unknown key(s) {sorted(unknown)}; allowed: {sorted(TINY_DEFAULTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    vocab_size = _train_tokenizer(out, params)

    torch.manual_seed(params["seed"])
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=params["hidden_size"],
        intermediate_size=params["intermediate_size"],
        num_hidden_layers=params["num_hidden_layers"],
        num_attention_heads=params["num_attention_heads"],
        num_key_value_heads=params["num_key_value_heads"],
        max_position_embeddings=params["max_position_embeddings"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar would land among the log lines
    model.save_pretrained(out)
    return out
