"""Which precision this machine computes natively. Imports only torch."""

from __future__ import annotations

import torch


def native_bf16() -> bool:
    """Whether this machine computes bf16 in hardware: any CUDA device, or a CPU with AVX512-BF16 or
    AMX (oneDNN's check; torch's cpu capability reports such a CPU as plain AVX512)."""
    return torch.cuda.is_available() or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
