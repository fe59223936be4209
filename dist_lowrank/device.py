"""Device and process-group backend chosen from the environment, never hard-coded."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def default_device() -> torch.device:
    """CUDA (this process's LOCAL_RANK) when available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def default_dist_backend() -> str:
    """nccl on CUDA, gloo otherwise (overridable with DIST_LOWRANK_DIST_BACKEND)."""
    override = os.environ.get("DIST_LOWRANK_DIST_BACKEND")
    if override:
        return override
    return "nccl" if torch.cuda.is_available() else "gloo"


def comm_device() -> torch.device:
    """Where tensors must live for collectives of the initialized process group (cuda for nccl)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return default_device()
    return torch.device("cpu")
