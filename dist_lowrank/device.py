"""Device and process-group backend chosen from the environment, never hard-coded.

Every tensor the plugin creates is made on the device of the data it meets (`module_device`, or the
tensor's own `.device`), and collectives run on `comm_device()` (CUDA tensors under NCCL). Each rank
binds its CUDA device from LOCAL_RANK before a process group exists (`before_process_group`): NCCL's
object collectives (broadcast_object_list, all_gather_object) use `torch.cuda.current_device()`, and
without the bind every rank would put them on GPU 0.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """A process group is up (torch.distributed available and initialized): the one test every module uses."""
    return dist.is_available() and dist.is_initialized()


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
    if is_distributed() and dist.get_backend() == "nccl":
        return default_device()
    return torch.device("cpu")


def bind_local_device() -> torch.device:
    """Make this rank's device (from LOCAL_RANK) the current CUDA device; call before the process group is
    made. A no-op without CUDA. Returns the device."""
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def before_process_group() -> torch.device:
    """Everything a rank does before its process group exists: bind its device (bind_local_device) and import
    torch._dynamo. torch 2.13's first import of torch._dynamo takes references to the live default group from
    C++ that destroy_process_group cannot drop (every optimizer's add_param_group imports it lazily, so every
    run does it after the group exists); the gloo backend then outlives destroy_process_group and its threads
    are torn down in interpreter exit, which aborts a rank ("terminate called without an active exception")
    when its peer is still closing: 3 of 30 two-rank exits here, 0 of 30 with the import first
    (tests/unit/test_rank_process_exit.py). Returns this rank's device."""
    import torch._dynamo  # noqa: F401  (the import is the point)

    return bind_local_device()


def end_process_group() -> None:
    """Collect garbage, then destroy the process group. Engines (DDP's reducer, FSDP2's and DeepSpeed's
    state) hold the group from C++ and sit in reference cycles through their hooks; left to the collector
    they outlive destroy_process_group and free the group's gloo threads during interpreter exit, which
    aborts a rank when its peer is still closing (see before_process_group)."""
    import gc

    gc.collect()
    dist.destroy_process_group()


def module_device(module: nn.Module) -> torch.device:
    """The device a module computes on: its first parameter's (or buffer's); the default device if it has none.
    DTensor parameters (FSDP2) report the device of their local shard; ZeRO-3 placeholders theirs."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return default_device()


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (tensor, or tuple / list / dict of them) moved to `device`; other values are left as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch
