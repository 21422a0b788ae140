"""Honest training throughput: FLOPs per token, the device's peak, MFU, peak memory. Imports only torch.

FLOPs per token (forward and backward, PaLM's convention, Chowdhery et al. 2022, appendix B):
6 x the parameters that take part in a matmul (every parameter but the input embedding table and
the norms; a tied output layer counts once; 4 for a frozen one, 2 for a frozen one below every
trained one, which the backward pass never reaches), plus 12 x layers x hidden x sequence length for the
attention scores and their weighted sum. The output layer runs only on label tokens
(labtune/training/loss.py), so its 6 x vocabulary x hidden is counted on those alone. MFU is the FLOPs
done per second over the device's dense bf16 peak; for a device this table does not know, MFU is
not reported (never guessed).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch

from labtune.training.frozen_prefix import inert_depth

# dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets; the first
# name found in the device's name wins, so the longer names come first
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12), ("H100", 989e12),
    ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("RTX 6000 Ada", 364e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("L4", 121e12), ("A10", 125e12),
    ("MI300X", 1307e12), ("MI250X", 383e12),
]


def peak_flops_of(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name ("NVIDIA H100 80GB HBM3"), None for one not in the table."""
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when it is a CPU or a GPU this table does not name."""
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers, input side first (the classes it names in _no_split_modules)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


@dataclass(frozen=True)
class FlopsModel:
    """What one token costs to train, split so the output layer is counted on label tokens only.
    A frozen weight needs no weight gradient: 4 FLOPs per parameter, not 6 (LoRA's base); a frozen
    weight below every trained one (the lowest layers when they and the embeddings are frozen) is
    not in the backward pass at all: 2, its forward."""

    trained: int  # matmul parameters of the decoder layers that train
    frozen: int  # that do not train but pass gradients down to trained ones
    head: int  # the output layer (vocabulary x hidden)
    head_trains: bool
    layers: int
    hidden: int
    inert: int = 0  # frozen, and below every trained parameter: forward only
    skipped_layers: int = 0  # lowest layers whose output is computed once, before training (frozen_prefix)

    @classmethod
    def of(cls, model: torch.nn.Module) -> "FlopsModel":
        """Counted on the model before sharding (or on DTensors, whose numel is the full size)."""
        head = model.get_output_embeddings()
        embed = model.get_input_embeddings()
        skip = {id(m.weight) for m in (head, embed) if m is not None}
        matmul = lambda p: id(p) not in skip and p.dim() >= 2  # noqa: E731 - norms and biases have no matmul
        # the backward pass starts at the output and stops below the lowest parameter that trains
        layers = decoder_layers(model)
        inert_ids = {id(p) for layer in layers[: inert_depth(model, layers)] for p in layer.parameters()}
        body = [p for p in model.parameters() if matmul(p)]
        return cls(trained=sum(p.numel() for p in body if p.requires_grad),
                   frozen=sum(p.numel() for p in body if not p.requires_grad and id(p) not in inert_ids),
                   inert=sum(p.numel() for p in body if id(p) in inert_ids),
                   head=head.weight.numel() if head is not None else 0,
                   head_trains=bool(head is not None and head.weight.requires_grad),
                   layers=int(model.config.num_hidden_layers), hidden=int(model.config.hidden_size))

    def flops(self, tokens: int, label_tokens: int, mean_length: float) -> float:
        """Training FLOPs for `tokens` (non-pad) of which `label_tokens` are scored, in sequences of
        `mean_length` tokens on average."""
        return ((6 * self.trained + 4 * self.frozen + 2 * self.inert) * tokens
                + (6 if self.head_trains else 4) * self.head * label_tokens
                + 12 * (self.layers - self.skipped_layers) * self.hidden * mean_length * tokens)

    def without_prefix(self, depth: int) -> "FlopsModel":
        """The per-step cost once the lowest `depth` (inert) layers are computed once, not per step."""
        return replace(self, inert=0, skipped_layers=depth)

    def prefix_flops(self, depth: int, tokens: int, mean_length: float) -> float:
        """Running `tokens` once through the inert layers (`depth` of them): their forward."""
        return 2 * self.inert * tokens + 4 * depth * self.hidden * mean_length * tokens

    def forward_flops(self, tokens: int, label_tokens: int, mean_length: float) -> float:
        """A forward pass alone (early stopping's dev questions): 2 per matmul parameter."""
        return (2 * (self.trained + self.frozen + self.inert) * tokens + 2 * self.head * label_tokens
                + 4 * (self.layers - self.skipped_layers) * self.hidden * mean_length * tokens)


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak: allocated GPU memory on CUDA, the resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def synchronize(device: torch.device) -> None:
    """Wait for the device: a host clock read before this measures the launch, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mfu(flops: float, seconds: float, peak: float | None, devices: int) -> float | None:
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * devices)


def describe(peak: float | None, device: Any) -> str:
    return f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else f"unknown peak for {device}: MFU not reported"
