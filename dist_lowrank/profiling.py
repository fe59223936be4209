"""Measure, don't guess, which layers are worth factorizing.

Cuttlefish picks the early layers to keep dense by hand from offline timing tables. Here each
candidate is timed at the switch on the device in use: a few forward+backward passes of a dense
module and of its factorized replacement at the planned rank, at the real activation shape seen in
training, the candidates taking turns pass by pass so that load on a shared host hits them alike.
Times are averaged over ranks with one all-reduce, so every rank takes the same decision.
With rank_search, a layer that misses the speed target at the planned rank is timed once more (a
second round, again one all-reduce for all layers) at a few lower ranks down to the strategy's
quality floor, and takes the largest that is fast enough.
Modules are rebuilt with random weights of the same shapes: timing does not depend on the values,
and sharded engines (ZeRO-3, FSDP2) do not hold the real weights locally anyway. Those weights and
inputs come from the plugin's seed inside a forked RNG: the user's global RNG stream is left as it was.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from dist_lowrank.device import comm_device, is_distributed
from dist_lowrank.layers import LowRankConv2d, LowRankLinear, is_hf_conv1d
from dist_lowrank.plan import Plan
from dist_lowrank.rank_budget import allocate_total_speedup, total_speedup


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


def param_dtype(shape: tuple[int, ...]) -> torch.dtype:
    """Stand-in weights' dtype: fp32 under autocast (autocast casts them, as in training), else the input's."""
    dtype = getattr(shape, "dtype", torch.float32)
    if getattr(shape, "autocast", None) is not None or not dtype.is_floating_point:
        return torch.float32
    return dtype


def stand_in(module: nn.Module, rank: Optional[int], device: torch.device,
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
    """Fastest seconds of one forward+backward at `input_shape` (one warm-up pass first), in the input's
    dtype and under the autocast the training forward ran with (an InputShape says; fp32 otherwise).

    The backward includes the input's gradient, as every targeted layer inside a network computes it (a
    third of a Linear's backward). The minimum, not the median: on a shared host other work only ever adds
    time, and every rank must see the layer's own cost to take the same decision."""
    autocast = getattr(input_shape, "autocast", None)
    dtype = getattr(input_shape, "dtype", torch.float32)
    x = torch.randn(*input_shape, device=device, dtype=dtype if dtype.is_floating_point else torch.float32,
                    requires_grad=True)
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
        x.grad = None
    return min(samples)


@contextmanager
def plugin_rng(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG seeded with `seed` inside, restored on exit (CPU, and `device` when it is CUDA)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


Timer = Callable[[nn.Module, tuple, int, torch.device], float]

SEARCH_CANDIDATES = 5  # at most this many extra timings per layer: the switch stays cheap
TENSOR_CORE_MULTIPLE = 8  # candidate ranks are rounded to multiples of this where that stays in range


def search_ranks(planned: int, floor: int, count: int = SEARCH_CANDIDATES,
                 multiple: int = TENSOR_CORE_MULTIPLE) -> list[int]:
    """Candidate ranks below `planned`, down to `floor` inclusive, largest first.

    Geometric between planned and floor (speed is roughly linear in rank, so equal ratios are equal
    steps in time saved), rounded to multiples of `multiple` (tensor-core tiles) when at least one
    multiple and that keeps the rank strictly between floor and planned; the floor itself is always the last candidate, exact.
    A pure function of (planned, floor): every rank times the same candidates.
    """
    if floor >= planned or floor < 1:
        return []
    out: list[int] = []
    for i in range(1, count):
        r = planned * (floor / planned) ** (i / count)
        rounded = int(round(r / multiple)) * multiple if r >= multiple else 0
        r = rounded if floor < rounded < planned else int(round(r))
        if floor < r < planned and r not in out:
            out.append(r)
    out.append(floor)
    return sorted(set(out), reverse=True)


def time_interleaved(stand_ins: list[tuple[nn.Module, tuple]], iters: int, device: torch.device,
                     timer: Timer = time_module) -> list[float]:
    """Fastest single-pass seconds of each (module, input shape), the modules taking turns pass by pass.

    Timed one after the other, a burst of load on a shared host lands on every pass of one candidate and
    flips the decision between two ranks (dense vs rank r measured in different moments); taking turns,
    every candidate gets passes before, during and after the burst, and the fastest of each is its own cost."""
    best = [float("inf")] * len(stand_ins)
    for _ in range(iters):
        for i, (module, shape) in enumerate(stand_ins):
            best[i] = min(best[i], timer(module, shape, 1, device))
    return best


def timing_key(module: nn.Module, shape: tuple[int, ...], rank: Optional[int]) -> tuple:
    """What a stand-in's time depends on: its kind and dimensions, the input's shape, dtype and autocast,
    and the rank (None = dense)."""
    if isinstance(module, LowRankConv2d):  # a factorized stand-in: the dimensions of the conv it replaces
        first, second = module.first, module.second
        dims: tuple = ("conv2d", first.in_channels, second.out_channels, first.kernel_size, first.stride,
                       first.padding, first.dilation, second.bias is not None)
    elif isinstance(module, nn.Conv2d):
        dims = ("conv2d", module.in_channels, module.out_channels, module.kernel_size, module.stride,
                module.padding, module.dilation, module.bias is not None)
    elif is_hf_conv1d(module):
        dims = ("linear", module.nx, module.nf)
    else:
        dims = ("linear", module.in_features, module.out_features)
    return dims + (tuple(shape), str(getattr(shape, "dtype", torch.float32)),
                   str(getattr(shape, "autocast", None)), rank)


def _all_reduce_mean(local: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (one all-reduce on the comm device); identity without a process group."""
    if is_distributed() and local.numel():
        moved = local.to(comm_device())
        dist.all_reduce(moved)
        return moved.cpu() / dist.get_world_size()
    return local


def _speedup(dense_t: float, fact_t: float) -> float:
    return dense_t / fact_t if fact_t > 0 else float("inf")


def keep_dense_where_not_faster(plan: Plan, modules: dict[str, nn.Module], shapes: dict[str, tuple[int, ...]],
                                iters: int, min_speedup: float, device: torch.device,
                                seed: int = 0, rank_search: bool = False,
                                timer: Timer = time_module, scope: str = "layer") -> tuple[Plan, dict]:
    """Drop layers from the plan whose factorized form is not `min_speedup` faster; times averaged over ranks.

    Round 1 times every layer dense and at its planned rank. With `rank_search`, a layer that misses
    the target and has a quality floor `plan.floors[name]` below its planned rank is timed in round 2
    at `search_ranks(planned, floor)` and takes the LARGEST candidate that meets the target (the
    Pareto point: most spectral capacity at the required speed); it is kept dense only if even the
    floor misses. Without a floor it is kept dense, as without the search. Each round is one
    all-reduce over all its layers, and every decision is taken on the averaged times, so every
    rank decides the same.

    min_speedup: with the search, 1.0 (the default) means "never slower than dense", and a layer
    that is slightly faster keeps its planned rank; a higher target (e.g. 1.5) trades capacity for
    speed, each layer giving up only as much rank as it needs, never below its floor.

    scope "total": `min_speedup` is a target on the timed layers together (summed dense time over summed
    factorized time) instead of a bar for each; every layer with a floor is searched, and
    `rank_budget.allocate_total_speedup` lowers ranks where that saves most time per rank given up,
    keeping factorized every layer that is faster than dense at some rank.

    Returns the filtered plan (reasons filled in for every candidate) and the timing table: per
    layer dense_s, factorized_s/speedup at the planned rank, every rank timed (`candidates`), and
    the final choice (`chosen_rank`, None = dense, and its `chosen_speedup`, 1.0 when dense).
    Layers with no recorded activation shape are kept (there is nothing to time; reason says so).
    """
    names = sorted(plan.ranks)
    timed = [n for n in names if n in shapes and n in modules]

    def time_round(jobs: list[tuple[str, Optional[int]]]) -> list[float]:
        """Seconds per (layer, rank) job; each distinct stand-in is timed once and shared, so layers of
        the same shape (every block of a transformer) get the same times and the same decision."""
        keys = [timing_key(modules[name], shapes[name], rank) for name, rank in jobs]
        unique = list(dict.fromkeys(keys))
        first_job = {key: job for key, job in zip(reversed(keys), reversed(jobs))}
        with plugin_rng(seed, device):
            stand_ins = [(stand_in(modules[name], rank, device, param_dtype(shapes[name])), shapes[name])
                         for name, rank in (first_job[key] for key in unique)]
            local = torch.tensor(time_interleaved(stand_ins, iters, device, timer), dtype=torch.float64)
        averaged = [float(t) for t in _all_reduce_mean(local)]
        return [averaged[unique.index(key)] for key in keys]

    first = [(n, r) for name in timed for n, r in ((name, None), (name, plan.ranks[name]))]
    times = time_round(first) if timed else []
    ranks, reasons, table = dict(plan.ranks), dict(plan.reasons), {}
    for i, name in enumerate(timed):
        dense_t, fact_t = times[2 * i], times[2 * i + 1]
        speedup = _speedup(dense_t, fact_t)
        table[name] = {"dense_s": dense_t, "factorized_s": fact_t, "speedup": speedup,
                       "candidates": [{"rank": plan.ranks[name], "factorized_s": fact_t, "speedup": speedup}]}
    failing = timed if scope == "total" else [n for n in timed if table[n]["speedup"] < min_speedup]
    searched = {n: search_ranks(plan.ranks[n], min(plan.floors[n], plan.ranks[n]))
                for n in failing if rank_search and n in plan.floors}
    jobs = [(n, r) for n in failing for r in searched.get(n, [])]
    for (name, rank), fact_t in zip(jobs, time_round(jobs) if jobs else []):
        table[name]["candidates"].append({"rank": rank, "factorized_s": fact_t,
                                          "speedup": _speedup(table[name]["dense_s"], fact_t)})
    if scope == "total":
        ranks, reasons = _apply_total_allocation(plan, timed, table, searched, min_speedup)
    else:
        ranks, reasons = _apply_layer_bar(plan, timed, table, searched, min_speedup, rank_search)
    for name in names:
        if name not in table:
            reasons[name] = f"factorized: rank {plan.ranks[name]} (no activation shape recorded, not timed)"
    return replace(plan, ranks=ranks, reasons=reasons), table


def _apply_layer_bar(plan: Plan, timed: list[str], table: dict, searched: dict[str, list[int]],
                     min_speedup: float, rank_search: bool) -> tuple[dict[str, int], dict[str, str]]:
    """Scope "layer": each timed layer keeps its planned rank, the largest searched rank that meets
    `min_speedup`, or goes dense; returns the ranks and reasons of the plan."""
    ranks, reasons = dict(plan.ranks), dict(plan.reasons)
    for name in timed:
        row, planned = table[name], plan.ranks[name]
        if row["speedup"] >= min_speedup:
            row["chosen_rank"], row["chosen_speedup"] = planned, row["speedup"]
            reasons[name] = f"factorized: rank {planned}, {row['speedup']:.2f}x faster than dense"
            continue
        planned_miss = f"rank {planned} is {row['speedup']:.2f}x dense (< {min_speedup})"
        if name not in searched or not searched[name]:
            del ranks[name]
            row["chosen_rank"], row["chosen_speedup"] = None, 1.0
            why = ("" if not rank_search else "; no floor to search down to" if name not in plan.floors
                   else f"; floor {plan.floors[name]} leaves no lower rank to try")
            reasons[name] = f"kept dense: factorized at {planned_miss}{why}"
            continue
        floor = searched[name][-1]
        lower = row["candidates"][1:]  # largest first: the first that meets the target is the Pareto point
        hit = next((c for c in lower if c["speedup"] >= min_speedup), None)
        if hit is None:
            del ranks[name]
            best = max(lower, key=lambda c: c["speedup"])
            row["chosen_rank"], row["chosen_speedup"] = None, 1.0
            reasons[name] = (f"kept dense: no rank from {planned} down to floor {floor} is {min_speedup}x faster "
                             f"(best {best['speedup']:.2f}x at rank {best['rank']}; tried "
                             f"{', '.join(str(c['rank']) for c in row['candidates'])})")
        else:
            ranks[name] = hit["rank"]
            row["chosen_rank"], row["chosen_speedup"] = hit["rank"], hit["speedup"]
            reasons[name] = (f"factorized: rank {hit['rank']} (searched from {planned} down to floor {floor}): "
                             f"{hit['speedup']:.2f}x faster than dense ({planned_miss})")
    return ranks, reasons


def _apply_total_allocation(plan: Plan, timed: list[str], table: dict, searched: dict[str, list[int]],
                            target: float) -> tuple[dict[str, int], dict[str, str]]:
    """Scope "total": the ranks `allocate_total_speedup` gives the timed layers, with a reason for each."""
    chosen = allocate_total_speedup({name: table[name] for name in timed}, target)
    together = total_speedup(table, chosen)
    verdict = (f"the {len(timed)} timed layers together {together:.2f}x faster than dense, target {target}"
               + ("" if together >= target else ": not reached, every layer at its fastest timed rank"))
    ranks, reasons = dict(plan.ranks), dict(plan.reasons)
    for name in timed:
        row, planned, rank = table[name], plan.ranks[name], chosen[name]
        if rank is None:
            del ranks[name]
            row["chosen_rank"], row["chosen_speedup"] = None, 1.0
            reasons[name] = f"kept dense: no rank tried ({', '.join(str(c['rank']) for c in row['candidates'])}) " \
                            f"is faster than dense ({verdict})"
            continue
        speedup = next(c["speedup"] for c in row["candidates"] if c["rank"] == rank)
        ranks[name] = rank
        row["chosen_rank"], row["chosen_speedup"] = rank, speedup
        where = f"rank {rank}" if rank == planned else \
            f"rank {rank} (searched from {planned} down to floor {searched[name][-1]})"
        reasons[name] = f"factorized: {where}, {speedup:.2f}x faster than dense on its own ({verdict})"
    return ranks, reasons
