"""DLRT's decision rule: the physical capacity follows the rank the integrator asks for.

A rank that outgrows its capacity makes it grow geometrically (× growth_factor, rounded up to a multiple), so a
run reshards O(log r) times; a rank that stays below shrink_below · capacity for shrink_patience consecutive steps
makes it shrink (hysteresis: a rank that dips for a step or two causes no reshard). Pure: no tensors, no engine."""
from __future__ import annotations

from typing import Any, Optional

from dist_lowrank.plan import Plan


def capacity_for(rank: int, m: int, n: int, growth: float, multiple: int, max_rank: int) -> int:
    """Room for `rank` × growth, rounded up to a multiple, within max_rank and min(m, n) (never below rank)."""
    wanted = -(-int(-(-rank * growth // 1)) // multiple) * multiple
    return max(rank, min(wanted, max_rank, min(m, n)))


class CapacityRule:
    """Counts steps below the shrink threshold per layer and turns the wanted ranks into a resize Plan."""

    def __init__(self, cfg: Any, dims: dict[str, tuple[int, int]], max_ranks: dict[str, int]) -> None:
        self.cfg, self.dims, self.max_ranks = cfg, dict(dims), dict(max_ranks)
        self.below: dict[str, int] = {n: 0 for n in dims}

    def observe(self, name: str, rank: int, capacity: int) -> None:
        self.below[name] = self.below[name] + 1 if rank < self.cfg.shrink_below * capacity else 0

    def decide(self, step: int, wanted: dict[str, int], ranks: dict[str, int], capacities: dict[str, int]
               ) -> Optional[Plan]:
        cfg, new = self.cfg, {}
        for name in sorted(wanted):
            m, n = self.dims[name]
            top, cap = self.max_ranks[name], capacities[name]
            if wanted[name] > cap and cap < top:
                new[name] = capacity_for(wanted[name], m, n, cfg.growth_factor, cfg.capacity_multiple, top)
            elif self.below[name] >= cfg.shrink_patience:
                smaller = capacity_for(ranks[name], m, n, cfg.growth_factor, cfg.capacity_multiple, top)
                if smaller < cap:
                    new[name] = smaller
        if not new:
            return None
        return Plan("resize", step, {n: ranks[n] for n in new}, capacities=new)

    def resized(self, names) -> None:
        for name in names:
            self.below[name] = 0

    def state_dict(self) -> dict[str, Any]:
        return {"below": dict(self.below)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.below.update(state.get("below", {}))
