"""Fixed-ratio baseline (Pufferfish): every layer at ⌈ratio·min(m,n)⌉ after a warm-up.

The switch comes at the first observation with step >= max(1, warmup_steps): step 0 is the init
measurement taken before training, whose result the controller does not execute.
Plan.floors stays empty: the ratio is the only statement about quality here, so the switch's rank
search (switch.rank_search) has no lower rank to go to and keeps a layer that is not fast enough dense.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from dist_lowrank.methods.fixed.config import FixedConfig
from dist_lowrank.layers import saves_parameters
from dist_lowrank.plan import Plan
from dist_lowrank.methods.rule import Strategy


class FixedRatioStrategy(Strategy):
    """One Plan(kind="switch") at the first observation past the warm-up; ignores the stable ranks."""

    def __init__(self, cfg: FixedConfig, dims: dict[str, tuple[int, int]], min_rank: int = 1) -> None:
        self.cfg, self.dims, self.min_rank = cfg, dict(dims), min_rank
        self.done = False

    def observe(self, step: int, sranks: dict[str, float]) -> Optional[Plan]:
        if self.done or step < max(1, self.cfg.warmup_steps):
            return None
        ranks, reasons = {}, {}
        for name in sorted(self.dims):
            m, n = self.dims[name]
            rank = max(self.min_rank, math.ceil(self.cfg.ratio * min(m, n)))
            if saves_parameters(m, n, rank):
                ranks[name] = rank
                reasons[name] = f"rank {rank} = ceil({self.cfg.ratio} * {min(m, n)})"
            else:
                reasons[name] = f"kept dense: rank {rank} saves no parameters for {m}x{n}"
        self.done = True
        return Plan("switch", step, ranks, reasons=reasons)

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = bool(state["done"])
