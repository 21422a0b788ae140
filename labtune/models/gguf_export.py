"""A Hugging Face LLaMA-family folder written as one GGUF file, for llama.cpp, Ollama and LM Studio.

Written with `gguf`, the package llama.cpp maintains: the architecture's metadata, the tokenizer
(SentencePiece pieces with their scores, or byte-level BPE tokens with their merges), its special
tokens, the chat template training used (vicuna_v1.1 written out as Jinja when the tokenizer has
none), and the tensors in GGUF's names. Tensors stream one at a time from the safetensors files, so
memory holds one tensor, not the model. Query and key projections are permuted to GGUF's rotary
layout (llama.cpp pairs neighbouring dimensions, Hugging Face the two halves); every reader of
GGUF undoes it.

    f32   every tensor as it is (a lossless copy, for checks)
    f16   2-D weights in float16, norms in float32 (llama.cpp's MOSTLY_F16)
    q8_0  2-D weights in 8-bit blocks of 32 with a float16 scale, norms in float32 (MOSTLY_Q8_0)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from labtune.data.chat import VICUNA_CHAT_TEMPLATE
from labtune.errors import LabtuneError

QUANTS = ("f32", "f16", "q8_0")


class ExportError(LabtuneError):
    """The model cannot be written as GGUF (architecture, tokenizer, setting); one line says why."""


def gguf_types(quant: str) -> tuple[Any, Any]:
    """(GGML tensor type for 2-D weights, llama.cpp file type) of a quant name."""
    from gguf import GGMLQuantizationType, LlamaFileType

    if quant not in QUANTS:
        raise ExportError(f"--quant {quant}: expected one of {', '.join(QUANTS)}")
    return {"f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
            "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
            "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0)}[quant]


def _config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{model_dir}: no config.json (not a Hugging Face model folder)")
    config = json.loads(path.read_text())
    if config.get("model_type") != "llama":
        raise ExportError(f"{model_dir}: model_type {config.get('model_type')!r}; GGUF export writes LLaMA-family "
                          "models (model_type llama: LLaMA, Vicuna, SmolLM2, TinyLlama ...)")
    return config


def _rope_theta(config: dict[str, Any]) -> float:
    return float((config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta") or 10000.0)


def write_metadata(writer: Any, config: dict[str, Any], name: str, file_type: Any) -> None:
    heads = config["num_attention_heads"]
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)


def _bpe_pre(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for how a byte-level BPE tokenizer splits text before merging: SmolLM2's
    (single digits, then byte-level) is "smollm"; anything else is written as "default"."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [])] if pre.get("type") == "Sequence" else [pre.get("type")]
    return "smollm" if kinds == ["Digits", "ByteLevel"] else "default"


def write_tokenizer(writer: Any, model_dir: Path, chat_template: str) -> None:
    """Tokens, scores and types; merges and special tokens; the chat template."""
    import gguf

    if (model_dir / "tokenizer.model").is_file():
        vocab: Any = gguf.SentencePieceVocab(model_dir)
        writer.add_tokenizer_model("llama")
    elif (model_dir / "tokenizer.json").is_file():
        tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
        if tokenizer_json.get("model", {}).get("byte_fallback"):  # LLaMA's SentencePiece, saved as a fast tokenizer
            vocab = gguf.LlamaHfVocab(model_dir)
            writer.add_tokenizer_model("llama")
        else:
            try:
                vocab = gguf.BpeVocab(model_dir)
            except FileNotFoundError:
                raise ExportError(f"{model_dir}: tokenizer.json is neither LLaMA's SentencePiece nor byte-level BPE") \
                    from None
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(_bpe_pre(tokenizer_json))
    else:
        raise ExportError(f"{model_dir}: no tokenizer.model or tokenizer.json to write into the GGUF")
    tokens, scores, types = zip(*vocab.all_tokens())
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    special = gguf.SpecialVocab(model_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
    special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)


def permuted_for_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """A query or key projection's rows reordered from Hugging Face's rotary layout (each head's
    first half of dimensions paired with its second half) to GGUF's (neighbours paired)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _planned(name: str, shape: tuple[int, ...], kind: Any) -> tuple[tuple[int, ...], Any]:
    """(shape as stored, type) of one tensor: 1-D tensors (norms) stay float32, and a weight whose
    rows are not whole blocks of the quant's block size stays float16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quant_shape_to_byte_shape

    if len(shape) < 2:
        return shape, GGMLQuantizationType.F32
    if kind not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) and shape[-1] % GGML_QUANT_SIZES[kind][0]:
        kind = GGMLQuantizationType.F16
    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return shape, kind
    return quant_shape_to_byte_shape(shape, kind), kind


def _converted(tensor: np.ndarray, kind: Any) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    if kind == GGMLQuantizationType.F32:
        return tensor.astype(np.float32)
    if kind == GGMLQuantizationType.F16:
        return tensor.astype(np.float16)
    return quants.quantize(tensor.astype(np.float32), kind)


def write_tensors(writer: Any, model_dir: Path, config: dict[str, Any], kind: Any) -> int:
    """Every tensor under its GGUF name, streamed; returns how many."""
    import gguf
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir}: no .safetensors weights (labtune's model folders have them; convert others "
                          "with labtune import-model)")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    plan = []
    for path in files:
        with safe_open(path, "pt") as handle:
            for name in handle.keys():
                if name == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue
                target = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise ExportError(f"{model_dir}: tensor {name} has no GGUF name in the llama architecture")
                shape = tuple(handle.get_slice(name).get_shape())
                stored, typ = _planned(name, shape, kind)
                plan.append((path, name, target, typ))
                nbytes = int(np.prod(stored)) * (4 if typ == gguf.GGMLQuantizationType.F32 else
                                                 2 if typ == gguf.GGMLQuantizationType.F16 else 1)
                writer.add_tensor_info(target, stored, np.dtype(np.uint8 if stored != shape else
                                                                np.float32 if typ == gguf.GGMLQuantizationType.F32
                                                                else np.float16), nbytes, raw_dtype=typ)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for path, name, _, typ in plan:
        with safe_open(path, "pt") as handle:
            tensor = handle.get_tensor(name).float().numpy()
        if name.endswith("self_attn.q_proj.weight"):
            tensor = permuted_for_rope(tensor, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            tensor = permuted_for_rope(tensor, kv_heads)
        writer.write_tensor_data(_converted(tensor, typ))
    return len(plan)


def chat_template_of(model_dir: Path, template: str) -> str:
    """The Jinja chat template training used: the tokenizer's own, or vicuna_v1.1 written out
    (data.chat_template auto picks the tokenizer's when it has one)."""
    from transformers import AutoTokenizer

    from labtune.data.chat import resolve_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer.chat_template if resolve_template(tokenizer, template) == "tokenizer" else VICUNA_CHAT_TEMPLATE


def export_gguf(model_dir: str | Path, out: str | Path, quant: str = "q8_0", name: str | None = None,
                chat_template: str = "auto") -> Path:
    """Write model_dir as OUT/<name>-<quant>.gguf; returns its path."""
    import gguf

    model_dir, out = Path(model_dir), Path(out)
    config = _config(model_dir)
    kind, file_type = gguf_types(quant)
    name = name or model_dir.name
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}-{quant}.gguf"
    partial = target.with_name(target.name + ".partial")
    writer = gguf.GGUFWriter(partial, "llama")
    write_metadata(writer, config, name, file_type)
    write_tokenizer(writer, model_dir, chat_template_of(model_dir, chat_template))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tensors(writer, model_dir, config, kind)
    writer.close()
    partial.replace(target)  # a file under the final name is always whole
    return target


CHATML_OLLAMA = ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                 '{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}'
                 '<|im_start|>assistant\n{{ .Response }}<|im_end|>\n')
VICUNA_OLLAMA = '{{ if .System }}{{ .System }} {{ end }}{{ if .Prompt }}USER: {{ .Prompt }} {{ end }}ASSISTANT:{{ .Response }}</s>'


def modelfile(gguf_name: str, chat_template: str, system_prompt: str | None) -> str:
    """An Ollama Modelfile for the GGUF beside it: the prompt format training used (ChatML or
    vicuna_v1.1 in Ollama's template language), its stop tokens and its system prompt."""
    from labtune.data.chat import VICUNA_SYSTEM

    lines = [f"FROM ./{gguf_name}", ""]
    if chat_template == VICUNA_CHAT_TEMPLATE:
        lines += [f'TEMPLATE """{VICUNA_OLLAMA}"""', 'PARAMETER stop "</s>"', 'PARAMETER stop "USER:"']
        system = VICUNA_SYSTEM if system_prompt is None else system_prompt
    elif "<|im_start|>" in chat_template:
        # a system turn training gave, even an empty one, is always written, as training wrote it
        template = CHATML_OLLAMA if system_prompt is None else CHATML_OLLAMA.replace(
            "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}", "<|im_start|>system\n{{ .System }}<|im_end|>\n")
        lines += [f'TEMPLATE """{template}"""', 'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
        system = system_prompt
    else:
        lines += ["# Ollama reads the chat template inside the GGUF file (tokenizer.chat_template)"]
        system = system_prompt
    if system is None:
        lines += ["# the chat template's own system prompt applies (training used it)"]
    else:
        lines += [f'SYSTEM """{system}"""']
    return "\n".join(["# ollama create NAME -f Modelfile  (written by labtune export)", *lines, "PARAMETER temperature 0", ""])


def export_folder(model_dir: str | Path, out: str | Path, quant: str, name: str, chat_template: str = "auto",
                  system_prompt: str | None = None, card: str | None = None) -> dict[str, Any]:
    """The GGUF file, an Ollama Modelfile beside it and the model card (README.md: the given one,
    else the model folder's own); returns {gguf, bytes, files}."""
    model_dir, out = Path(model_dir), Path(out)
    path = export_gguf(model_dir, out, quant, name, chat_template)
    (out / "Modelfile").write_text(modelfile(path.name, chat_template_of(model_dir, chat_template), system_prompt))
    if card is not None:
        (out / "README.md").write_text(card)
    elif (model_dir / "README.md").is_file():
        (out / "README.md").write_text((model_dir / "README.md").read_text())
    return {"gguf": path.name, "bytes": path.stat().st_size, "files": sorted(p.name for p in out.iterdir())}
