"""Which precision this machine computes natively. Imports only torch."""

from __future__ import annotations

import os

import torch


def native_bf16() -> bool:
    """Whether this machine computes bf16 in hardware: any CUDA device, or a CPU with AVX512-BF16 or
    AMX (oneDNN's check; torch's cpu capability reports such a CPU as plain AVX512).
    LABTUNE_NO_NATIVE_BF16=1 says no on any machine: training and evaluation then take the fp32
    path of a CPU without bf16, for measuring what such a CPU costs on one that has it."""
    if bf16_forced_off():
        return False
    return torch.cuda.is_available() or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_forced_off() -> bool:
    """LABTUNE_NO_NATIVE_BF16 is set (to anything but 0)."""
    return os.environ.get("LABTUNE_NO_NATIVE_BF16", "") not in ("", "0")
