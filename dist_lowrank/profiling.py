"""Measure, don't guess, which layers are worth factorizing.

Cuttlefish picks the early layers to keep dense by hand from offline timing tables. Here each
candidate is timed at the switch on the device in use: a few forward+backward passes of a dense
module and of its factorized replacement at the planned rank, at the real activation shape seen in
training. Times are averaged over ranks with one all-reduce, so every rank takes the same decision.
Modules are rebuilt with random weights of the same shapes: timing does not depend on the values,
and sharded engines (ZeRO-3, FSDP2) do not hold the real weights locally anyway.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from dist_lowrank.device import comm_device
from dist_lowrank.layers import LowRankConv2d, LowRankLinear
from dist_lowrank.plan import Plan


@contextmanager
def record_input_shapes(model: nn.Module, names: list[str], shapes: dict[str, tuple[int, ...]]) -> Iterator[None]:
    """Record the shape of the first input each named module sees while the context is open."""
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        module = modules.get(name)
        if module is None:
            continue

        def hook(_mod, args, _name=name):
            if _name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[_name] = tuple(args[0].shape)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _stand_in(module: nn.Module, rank: Optional[int], device: torch.device) -> nn.Module:
    """A module of the same shape (dense when rank is None, factorized at `rank` otherwise)."""
    if isinstance(module, nn.Conv2d):
        dense = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                          module.padding, module.dilation, bias=module.bias is not None)
        return (dense if rank is None else LowRankConv2d.from_dense(dense, rank)).to(device)
    if hasattr(module, "nf") and hasattr(module, "nx"):  # HF Conv1D: weight stored (in, out)
        in_f, out_f = module.nx, module.nf
    else:
        in_f, out_f = module.in_features, module.out_features
    if rank is None:
        return nn.Linear(in_f, out_f).to(device)
    return LowRankLinear(in_f, out_f, rank).to(device)


def time_module(module: nn.Module, input_shape: tuple[int, ...], iters: int, device: torch.device) -> float:
    """Median seconds of one forward+backward at `input_shape` (one warm-up pass first)."""
    x = torch.randn(*input_shape, device=device, requires_grad=False)
    samples = []
    for i in range(iters + 1):
        start = time.perf_counter()
        module(x).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            samples.append(time.perf_counter() - start)
        module.zero_grad(set_to_none=True)
    samples.sort()
    return samples[len(samples) // 2]


def keep_dense_where_not_faster(plan: Plan, modules: dict[str, nn.Module], shapes: dict[str, tuple[int, ...]],
                                iters: int, min_speedup: float, device: torch.device) -> tuple[Plan, dict]:
    """Drop layers from the plan whose factorized form is not faster; times averaged over ranks.

    Returns the filtered plan (reasons filled in for every candidate) and the timing table.
    Layers with no recorded activation shape are kept (there is nothing to time; reason says so).
    """
    names = sorted(plan.ranks)
    timed = [n for n in names if n in shapes and n in modules]
    local = torch.zeros(2 * len(timed), dtype=torch.float64)
    for i, name in enumerate(timed):
        local[2 * i] = time_module(_stand_in(modules[name], None, device), shapes[name], iters, device)
        local[2 * i + 1] = time_module(_stand_in(modules[name], plan.ranks[name], device), shapes[name], iters, device)
    if dist.is_available() and dist.is_initialized() and timed:
        moved = local.to(comm_device())
        dist.all_reduce(moved)
        local = moved.cpu() / dist.get_world_size()
    ranks, reasons, table = dict(plan.ranks), dict(plan.reasons), {}
    for i, name in enumerate(timed):
        dense_t, fact_t = float(local[2 * i]), float(local[2 * i + 1])
        speedup = dense_t / fact_t if fact_t > 0 else float("inf")
        table[name] = {"dense_s": dense_t, "factorized_s": fact_t, "speedup": speedup}
        if speedup < min_speedup:
            del ranks[name]
            reasons[name] = f"kept dense: factorized at rank {plan.ranks[name]} is {speedup:.2f}x dense (< {min_speedup})"
        else:
            reasons[name] = f"factorized: rank {plan.ranks[name]}, {speedup:.2f}x faster than dense"
    for name in names:
        if name not in table:
            reasons[name] = f"factorized: rank {plan.ranks[name]} (no activation shape recorded, not timed)"
    return replace(plan, ranks=ranks, reasons=reasons), table
