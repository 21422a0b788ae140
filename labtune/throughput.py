"""Honest training throughput: FLOPs per token, the device's peak, MFU, peak memory. Imports only torch.

FLOPs per token (forward and backward, PaLM's convention, Chowdhery et al. 2022, appendix B):
6 x the parameters that take part in a matmul (every parameter but the input embedding table and
the norms; a tied output layer counts once), plus 12 x layers x hidden x sequence length for the
attention scores and their weighted sum. The output layer runs only on label tokens
(labtune/loss.py), so its 6 x vocabulary x hidden is counted on those alone. MFU is the FLOPs
done per second over the device's dense bf16 peak; for a device this table does not know, MFU is
not reported (never guessed).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch

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


@dataclass(frozen=True)
class FlopsModel:
    """What one token costs to train, split so the output layer is counted on label tokens only.
    A frozen weight (LoRA's base) needs no weight gradient: 4 FLOPs per parameter, not 6."""

    trained: int  # matmul parameters of the decoder layers that train
    frozen: int  # and those that do not
    head: int  # the output layer (vocabulary x hidden)
    head_trains: bool
    layers: int
    hidden: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> "FlopsModel":
        """Counted on the model before sharding (or on DTensors, whose numel is the full size)."""
        head = model.get_output_embeddings()
        embed = model.get_input_embeddings()
        skip = {id(m.weight) for m in (head, embed) if m is not None}
        # norms and biases have no matmul: only parameters of two or more dimensions count
        body = [p for p in model.parameters() if id(p) not in skip and p.dim() >= 2]
        return cls(trained=sum(p.numel() for p in body if p.requires_grad),
                   frozen=sum(p.numel() for p in body if not p.requires_grad),
                   head=head.weight.numel() if head is not None else 0,
                   head_trains=bool(head is not None and head.weight.requires_grad),
                   layers=int(model.config.num_hidden_layers), hidden=int(model.config.hidden_size))

    def flops(self, tokens: int, label_tokens: int, mean_length: float) -> float:
        """Training FLOPs for `tokens` (non-pad) of which `label_tokens` are scored, in sequences of
        `mean_length` tokens on average."""
        return ((6 * self.trained + 4 * self.frozen) * tokens + (6 if self.head_trains else 4) * self.head * label_tokens
                + 12 * self.layers * self.hidden * mean_length * tokens)


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
