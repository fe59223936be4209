"""InRank growth rule: grow a layer's rank while its update's spectrum says more is needed.

A layer of rank r trains r + buffer columns (the buffer is where new directions can appear). Every
`gap` steps after `warmup`, the singular values of those r + buffer columns give the new rank
k = first k in [r, r + buffer) with explained ratio g(k) > τ (see linalg.explained) — or r + buffer
when none qualifies — never below r, capped where factorizing stops saving parameters.
Capacity (what is physically allocated) must hold the trained width r + buffer (not just r: the
buffer columns are trained too); when it does not, it grows geometrically — ×growth_factor, rounded
up to a multiple — so resharding happens O(log r) times per layer, not at every growth.

InRank is driven by spectra, not stable ranks: `InRankGrowthRule.decide` takes singular values (its Method,
methods/inrank/method.py, measures them); `observe` returns None.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch

from dist_lowrank.methods.inrank.config import InRankConfig
from dist_lowrank.layers import max_saving_rank
from dist_lowrank.linalg import explained_variance_rank
from dist_lowrank.plan import Plan
from dist_lowrank.methods.rule import Strategy


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= value (allocation granularity)."""
    return int(math.ceil(value / multiple) * multiple)


def next_capacity(capacity: int, needed: int, factor: float, multiple: int, cap: int) -> int:
    """Capacity that holds `needed`: unchanged if it fits, else max(needed, ⌈capacity·factor⌉) rounded up."""
    if needed <= capacity:
        return capacity
    grown = round_up(max(needed, math.ceil(capacity * factor)), multiple)
    return max(needed, min(grown, cap))


def saving_cap(m: int, n: int) -> int:
    """Largest rank worth allocating: beyond it the factor pair is bigger than the dense layer."""
    return max(1, max_saving_rank(m, n))


def trained_width(cfg: InRankConfig, rank: int, m: int, n: int) -> int:
    """Columns trained for a layer of rank r: r + buffer, capped where factorizing stops saving."""
    return min(saving_cap(m, n), rank + cfg.buffer)


def initial_capacity(cfg: InRankConfig, m: int, n: int) -> int:
    """The initial trained width rounded up to the capacity multiple, capped where factorizing stops saving."""
    return min(saving_cap(m, n), round_up(trained_width(cfg, cfg.init_rank, m, n), cfg.capacity_multiple))


class InRankGrowthRule(Strategy):
    """Decides growth from singular values of each layer's low-rank part (computed by the caller)."""

    def __init__(self, cfg: InRankConfig, dims: dict[str, tuple[int, int]]) -> None:
        self.cfg, self.dims = cfg, dict(dims)
        self.done = False
        self.decisions: list[dict[str, Any]] = []  # every check's outcome (JSON; logged and resumed)
        self._warned: set[str] = set()

    def cap(self, name: str) -> int:
        return saving_cap(*self.dims[name])

    def initial_capacity(self, name: str) -> int:
        return initial_capacity(self.cfg, *self.dims[name])

    def is_check_step(self, step: int) -> bool:
        return step >= self.cfg.warmup and (step - self.cfg.warmup) % self.cfg.gap == 0

    def observe(self, step: int, sranks: dict[str, float]) -> Optional[Plan]:
        """InRank does not use stable ranks; the controller calls `decide` with singular values."""
        return None

    def decide(self, step: int, svals: dict[str, torch.Tensor], ranks: dict[str, int],
               capacities: dict[str, int]) -> Optional[Plan]:
        """Plan("grow") with the layers whose rank rises (and the capacities that must change), Plan("fix")
        once at fix_after, else None. A layer with non-finite singular values is skipped (warned once)."""
        if self.done:
            return None
        if self.cfg.fix_after is not None and step >= self.cfg.fix_after:
            self.done = True
            return Plan("fix", step, dict(ranks))
        if not self.is_check_step(step):
            return None
        new_ranks, new_caps = {}, {}
        for name in sorted(svals):
            r = ranks[name]
            if not bool(torch.isfinite(svals[name]).all()):
                if name not in self._warned:
                    warnings.warn(f"{name}: non-finite singular values; growth check skipped", RuntimeWarning,
                                  stacklevel=2)
                    self._warned.add(name)
                continue
            k = explained_variance_rank(svals[name], self.cfg.tau, r, r + self.cfg.buffer)
            k = min(max(k, r), self.cap(name))
            if k > r:
                new_ranks[name] = k
                width = trained_width(self.cfg, k, *self.dims[name])
                cap = next_capacity(capacities[name], width, self.cfg.growth_factor, self.cfg.capacity_multiple,
                                    self.cap(name))
                if cap != capacities[name]:
                    new_caps[name] = cap
        self.decisions.append({"step": step, "ranks": new_ranks, "capacities": new_caps})
        if not new_ranks:
            return None
        return Plan("grow", step, new_ranks, capacities=new_caps)

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "decisions": list(self.decisions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = bool(state["done"])
        self.decisions = list(state.get("decisions", []))
