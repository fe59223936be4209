"""Fixed-ratio baseline (Pufferfish): every layer at ⌈ratio·min(m,n)⌉ after a warm-up."""
from __future__ import annotations

import math
from typing import Any, Optional

from dist_lowrank.config import FixedConfig
from dist_lowrank.layers import saves_parameters
from dist_lowrank.plan import Plan
from dist_lowrank.strategies.base import Strategy


class FixedRatioStrategy(Strategy):
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
