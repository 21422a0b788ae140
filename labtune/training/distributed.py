"""Where this worker process runs: its rank, device and process group, and rank 0's log."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from labtune.recipe import TrainConfig


def log(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


@dataclass(frozen=True)
class Placement:
    """Where this process runs: its rank among world processes, its device, the device mesh."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    mesh: Any


def init_distributed(backend: str, train: TrainConfig) -> Placement:
    """The process group (NCCL on GPUs, gloo on CPUs or when asked) and this rank's device."""
    from torch.distributed.device_mesh import init_device_mesh

    use_cuda = torch.cuda.is_available() and backend != "gloo"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        if train.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Placement(rank, world, local_rank, device, "nccl" if use_cuda else "gloo", init_device_mesh(device.type, (world,)))
