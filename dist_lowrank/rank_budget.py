"""A speed target on the layers together, met where a step down in rank costs least.

A per-layer bar (`min_speedup` on each layer) asks as much of a cheap 256x256 projection as of the
layer that takes a third of the step, and keeps dense a layer that misses it by a hair, though that
layer alone would have saved more time than the others' lowering. A step is the sum of its layers:
this allocation starts every layer at its largest timed rank that is faster than dense and lowers
ranks one candidate at a time, always where the time saved per unit of log-rank given up is largest,
until the summed dense time over the summed chosen time reaches the target or every layer is at its
floor. Pure function of the timing table, so every rank (all holding the same averaged times) decides
the same.
"""
from __future__ import annotations

import math
from typing import Optional


def _options(row: dict) -> list[dict]:
    """The candidates faster than dense, largest rank first, each faster than the one before it."""
    out: list[dict] = []
    for cand in sorted(row["candidates"], key=lambda c: -c["rank"]):
        if cand["factorized_s"] < row["dense_s"] and (not out or cand["factorized_s"] < out[-1]["factorized_s"]):
            out.append(cand)
    return out


def total_speedup(table: dict[str, dict], chosen: dict[str, Optional[int]]) -> float:
    """Summed dense time over summed time of the choice (a layer kept dense counts at its dense time)."""
    def seconds(name: str) -> float:
        rank = chosen[name]
        if rank is None:
            return table[name]["dense_s"]
        return next(c["factorized_s"] for c in table[name]["candidates"] if c["rank"] == rank)

    spent = sum(seconds(name) for name in chosen)
    return sum(table[name]["dense_s"] for name in chosen) / spent if spent > 0 else float("inf")


def allocate_total_speedup(table: dict[str, dict], target: float) -> dict[str, Optional[int]]:
    """Rank per layer (None = dense) whose summed speed-up over dense reaches `target` where the candidates allow.

    `table[name]` has `dense_s` and `candidates` ({rank, factorized_s}, the planned rank among them); ties in
    the greedy go to the first name in sorted order, so layers of one shape are lowered one after the other.
    """
    options = {name: _options(table[name]) for name in sorted(table)}
    position = {name: 0 for name, opts in options.items() if opts}

    def chosen() -> dict[str, Optional[int]]:
        return {name: (opts[position[name]]["rank"] if name in position else None) for name, opts in options.items()}

    while total_speedup(table, chosen()) < target:
        best_name, best_gain = None, 0.0
        for name, i in position.items():
            opts = options[name]
            if i + 1 >= len(opts):
                continue
            here, lower = opts[i], opts[i + 1]
            gain = (here["factorized_s"] - lower["factorized_s"]) / math.log(here["rank"] / lower["rank"])
            if gain > best_gain:
                best_name, best_gain = name, gain
        if best_name is None:
            break  # every layer at its fastest timed rank: the target is out of reach
        position[best_name] += 1
    return chosen()
