"""Process setup: pick DeepSpeed's accelerator and backend, and make a plain `python` run a world of one.

Must run before deepspeed is imported anywhere: DeepSpeed picks its accelerator on first use. Imports deepspeed
for deepspeed.init_distributed, which starts the process group DeepSpeed's own communication layer then uses.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: str
    on_cpu: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_environment() -> bool:
    """Select the CPU accelerator when no GPU is visible; returns True when running on CPU."""
    import torch

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # a plain single-process run, not started by a launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return on_cpu


def init_distributed() -> DistInfo:
    on_cpu = setup_environment()
    import deepspeed
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cpu:
        device = "cpu"
    else:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, on_cpu)
