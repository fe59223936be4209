"""Measure, don't guess, which layers are worth factorizing.

Cuttlefish picks the early layers to keep dense by hand from offline timing tables. Here each
candidate is timed at the switch on the device in use: a few forward+backward passes of a dense
module and of its factorized replacement at the planned rank, at the real activation shape seen in
training. Times are averaged over ranks with one all-reduce, so every rank takes the same decision.
Modules are rebuilt with random weights of the same shapes: timing does not depend on the values,
and sharded engines (ZeRO-3, FSDP2) do not hold the real weights locally anyway. Those weights and
inputs come from the plugin's seed inside a forked RNG: the user's global RNG stream is left as it was.
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


class InputShape(tuple):
    """An activation shape seen in training, plus how that forward computed: the input's dtype and the
    autocast dtype in effect (None without autocast). Layers are timed the way they train: a bf16
    engine's layers in bf16, an autocast forward under autocast, not fp32 stand-ins whatever the run."""

    dtype: torch.dtype = torch.float32
    autocast: Optional[torch.dtype] = None

    def __new__(cls, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                autocast: Optional[torch.dtype] = None) -> "InputShape":
        obj = super().__new__(cls, shape)
        obj.dtype, obj.autocast = dtype, autocast
        return obj


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for `device_type` right now, or None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


@contextmanager
def record_input_shapes(model: nn.Module, names: list[str], shapes: dict[str, tuple[int, ...]]) -> Iterator[None]:
    """Record the shape (an InputShape: with dtype and autocast state) of the first input each named module
    sees while the context is open."""
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        module = modules.get(name)
        if module is None:
            continue

        def hook(_mod, args, _name=name):
            if _name not in shapes and args and isinstance(args[0], torch.Tensor):
                x = args[0]
                shapes[_name] = InputShape(tuple(x.shape), x.dtype, _autocast_dtype(x.device.type))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _param_dtype(shape: tuple[int, ...]) -> torch.dtype:
    """Stand-in weights' dtype: fp32 under autocast (autocast casts them, as in training), else the input's."""
    dtype = getattr(shape, "dtype", torch.float32)
    if getattr(shape, "autocast", None) is not None or not dtype.is_floating_point:
        return torch.float32
    return dtype


def _stand_in(module: nn.Module, rank: Optional[int], device: torch.device,
              dtype: torch.dtype = torch.float32) -> nn.Module:
    """A module of the same shape (dense when rank is None, factorized at `rank` otherwise), on `device`
    in `dtype`."""
    if isinstance(module, nn.Conv2d):
        dense = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                          module.padding, module.dilation, bias=module.bias is not None)
        return (dense if rank is None else LowRankConv2d.from_dense(dense, rank)).to(device=device, dtype=dtype)
    if hasattr(module, "nf") and hasattr(module, "nx"):  # HF Conv1D: weight stored (in, out)
        in_f, out_f = module.nx, module.nf
    else:
        in_f, out_f = module.in_features, module.out_features
    if rank is None:
        return nn.Linear(in_f, out_f, device=device, dtype=dtype)
    return LowRankLinear(in_f, out_f, rank).to(device=device, dtype=dtype)


def time_module(module: nn.Module, input_shape: tuple[int, ...], iters: int, device: torch.device) -> float:
    """Median seconds of one forward+backward at `input_shape` (one warm-up pass first), in the input's
    dtype and under the autocast the training forward ran with (an InputShape says; fp32 otherwise)."""
    autocast = getattr(input_shape, "autocast", None)
    dtype = getattr(input_shape, "dtype", torch.float32)
    x = torch.randn(*input_shape, device=device, dtype=dtype if dtype.is_floating_point else torch.float32)
    samples = []
    for i in range(iters + 1):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = module(x)
        out.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            samples.append(time.perf_counter() - start)
        module.zero_grad(set_to_none=True)
    samples.sort()
    return samples[len(samples) // 2]


@contextmanager
def plugin_rng(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG seeded with `seed` inside, restored on exit (CPU, and `device` when it is CUDA)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def keep_dense_where_not_faster(plan: Plan, modules: dict[str, nn.Module], shapes: dict[str, tuple[int, ...]],
                                iters: int, min_speedup: float, device: torch.device,
                                seed: int = 0, rank_search: bool = False) -> tuple[Plan, dict]:
    """Drop layers from the plan whose factorized form is not faster; times averaged over ranks.

    Returns the filtered plan (reasons filled in for every candidate) and the timing table.
    Layers with no recorded activation shape are kept (there is nothing to time; reason says so).
    """
    names = sorted(plan.ranks)
    timed = [n for n in names if n in shapes and n in modules]
    local = torch.zeros(2 * len(timed), dtype=torch.float64)
    with plugin_rng(seed, device):
        for i, name in enumerate(timed):
            dtype = _param_dtype(shapes[name])
            local[2 * i] = time_module(_stand_in(modules[name], None, device, dtype), shapes[name], iters, device)
            local[2 * i + 1] = time_module(_stand_in(modules[name], plan.ranks[name], device, dtype), shapes[name],
                                           iters, device)
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
