"""Round a switch plan's ranks up to a multiple the matmul kernels run fast at (`switch.rank_multiple`).

A factor's rank is an inner matmul dimension. Kernels block it (tensor-core tiles on GPUs, MKL/oneDNN's
register blocking on CPU), and an unaligned rank pays for the next aligned one or more: on this 2-core CPU host,
fwd+bwd of a 256×256 layer over 16 × 128 rows is 1.71× faster than dense at rank 47 and 2.17× at rank 48, 1.93×
at 39 and 2.44× at 40 (two processes at once, one thread each; tools/bench_speed_table.py --ranks, BENCHMARKS.md §5). Rounding up keeps at least the rank the strategy asked
for, so quality is not traded; a rank whose round-up would no longer save parameters stays as planned.
Floors (the lowest rank a speed search may go to) are rounded up the same way, never above the layer's rank.
Layers with an allocated capacity (DLRT's adaptive ranks) are left alone: their rank moves every step.
"""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from dist_lowrank.layers.shapes import matrix_dims, max_saving_rank
from dist_lowrank.plan import Plan


def round_up(rank: int, multiple: int) -> int:
    return -(-rank // multiple) * multiple


def aligned_rank(rank: int, multiple: int, cap: int) -> int:
    """`rank` rounded up to `multiple` where that stays within `cap`, else `rank` itself."""
    up = round_up(rank, multiple)
    return up if up <= cap else rank


def align_plan(plan: Plan, modules: dict[str, nn.Module], multiple: int) -> Plan:
    """The plan with every rank and floor rounded up to `multiple` (1 = unchanged), reasons noting the change."""
    if multiple <= 1:
        return plan
    ranks, floors, reasons = dict(plan.ranks), dict(plan.floors), dict(plan.reasons)
    for name, rank in plan.ranks.items():
        if name in plan.capacities or name not in modules:
            continue
        cap = max_saving_rank(*matrix_dims(modules[name]))
        ranks[name] = aligned_rank(rank, multiple, cap)
        if name in floors:
            floors[name] = min(aligned_rank(floors[name], multiple, cap), ranks[name])
        if ranks[name] != rank:
            note = f"rank {rank} rounded up to {ranks[name]} (switch.rank_multiple={multiple})"
            reasons[name] = f"{reasons[name]}; {note}" if reasons.get(name) else note
    return replace(plan, ranks=ranks, floors=floors, reasons=reasons)
