"""Shard views of DeepSpeed's fp32 masters, for the monitor under bf16 / fp16 training.

Stable ranks and spectra must come from fp32 values. With `bf16` or `fp16` the module's parameters (ZeRO-1/2)
and partitions (`ds_tensor`, ZeRO-3) are half-precision copies; the optimizer keeps the fp32 master, and each
rank holds one contiguous piece of it: ZeRO-3 the partition matching `ds_tensor`, ZeRO-1/2 the fragment
`param._hp_mapping` names (`lp_fragment_address`: start and length in the flattened parameter). Viewed as
shards, the monitor reads them where they are (its sharded path: Krylov vectors all-reduced, no weight
gathered). fp32 training keeps the module's own values: they are the masters.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from dist_lowrank.shard_view import ShardView

HALF = (torch.bfloat16, torch.float16)


def master_view(name: str, param: torch.Tensor) -> Optional[ShardView]:
    """This rank's piece of `param`'s fp32 master as a ShardView, or None (fp32 training, a frozen parameter,
    an engine without masters): then the caller reads the module's values."""
    if param.dtype not in HALF or not param.requires_grad:
        return None
    if hasattr(param, "ds_tensor"):  # ZeRO-3: the master partition lines up with ds_tensor
        optimizer = getattr(param, "_z3_optimizer", None)
        if optimizer is None:
            return None
        shape = tuple(param.ds_shape)
        numel = int(param.ds_numel)
        part = param.ds_tensor.numel()
        start = min(numel, dist.get_rank() * part)
        end = min(numel, start + part)
        local = optimizer.get_local_fp32_param(param).detach().reshape(-1)[: end - start]
        return ShardView(name, (shape[0], numel // shape[0]), start, local)
    if not hasattr(param, "_hp_mapping"):
        return None
    dims = (param.shape[0], param.numel() // param.shape[0])
    mapping = param._hp_mapping
    if mapping is None:  # no piece of this parameter's master on this rank
        return ShardView(name, dims, 0, torch.empty(0, dtype=torch.float32, device=param.device))
    address = mapping.lp_fragment_address
    return ShardView(name, dims, int(address.start), mapping.get_hp_fragment().detach().reshape(-1))
