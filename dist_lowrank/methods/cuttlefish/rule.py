"""Cuttlefish: switch to factorized layers once every layer's stable rank has stopped moving.

Per layer, the srank history (raw srank values, as in the reference: the threshold is in srank units,
not relative) is smoothed by an EMA (α = 2/(w+1), e_0 = x_0, pandas adjust=False), differentiated
(|e_t − e_{t−1}|), and the mean of the last k differences is compared with a threshold; once below,
the layer is stable for good.

Relaxation follows the reference (`layer_rank_stable_detector` in the Cuttlefish code, ResNet-18 /
VGG-19 setting): the bar is the base threshold until only stragglers are left, ×2.5 when two layers
remain unstable and ×5 when one remains (RELAX_FACTORS). It is computed from the stable set before
the current observation (the reference counts the remaining layers first), and it only grows as
layers become stable. One deviation: nothing is relaxed while no layer is stable yet (a model with
one or two tracked layers has no stragglers; the reference would relax it from the start).

Ranks: scaled rule r = ceil(ξ·srank_t) with ξ = min(m,n)/srank(W_0) from the init measurement
(srank 0 or no finite init value: ξ = 1), or raw r = ceil(srank_t); capped at min(m,n), floored at
max(min_rank, ceil(floor_fraction·min(m,n))); layers where r gives no parameter saving
(r ≥ mn/(m+n)) stay dense, with a reason in the plan — unless `search_above_saving` is set and the
layer's floor (below) does save parameters: then it is planned at the largest rank that saves any
(max_saving_rank), so the switch's rank search can look for a rank between that and the floor that is
fast enough (the demo GPT's square attn.c_proj layers, scaled rank 57–70% of full, are otherwise
never factorized).

Quality floors (scaled rule only): the raw rule's rank max(min_rank, ceil(floor_fraction·min(m,n)),
ceil(srank_t)) is the lowest rank the strategy accepts, put in Plan.floors; the switch's rank search
(switch.rank_search) may go down to it when the scaled rank is not fast enough. The raw rule's rank
is its own floor, so the raw rule leaves floors empty.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from dist_lowrank.methods.cuttlefish.config import CuttlefishConfig
from dist_lowrank.layers import max_saving_rank, saves_parameters
from dist_lowrank.plan import Plan
from dist_lowrank.methods.rule import NonFiniteFilter, Strategy

RELAX_FACTORS = {2: 2.5, 1: 5.0}  # layers still unstable -> threshold multiplier (reference: 2.5, then 2 × 2.5)


def ema(values: list[float], window: int) -> list[float]:
    """Exponential moving average with α = 2/(window+1), e_0 = x_0 (pandas adjust=False)."""
    alpha = 2.0 / (window + 1)
    out: list[float] = []
    for x in values:
        out.append(x if not out else alpha * x + (1 - alpha) * out[-1])
    return out


def stability_score(history: list[float], window: int, last_k: int) -> Optional[float]:
    """Mean |Δ EMA| over the last k steps; None until k differences exist."""
    smoothed = ema(history, window)
    diffs = [abs(b - a) for a, b in zip(smoothed, smoothed[1:])]
    if len(diffs) < last_k:
        return None
    tail = diffs[-last_k:]
    return sum(tail) / len(tail)


def scale_factor(full_rank: int, srank0: Optional[float]) -> float:
    """ξ = min(m,n) / srank(W_0); 1 when the init srank is missing or not positive (nothing to scale by)."""
    return full_rank / srank0 if srank0 is not None and srank0 > 0 else 1.0


class CuttlefishStrategy(Strategy):
    """Emits exactly one Plan(kind="switch"), then is done. The first `observe` is the init measurement."""

    def __init__(self, cfg: CuttlefishConfig, dims: dict[str, tuple[int, int]], min_rank: int = 1) -> None:
        self.cfg, self.dims, self.min_rank = cfg, dict(dims), min_rank
        self.xi: dict[str, float] = {}
        self.history: dict[str, list[float]] = {n: [] for n in dims}
        self.stable: dict[str, bool] = {n: False for n in dims}
        self.initialized = False
        self.done = False
        self._filter = NonFiniteFilter()

    def threshold(self) -> float:
        """The (possibly relaxed) threshold for the current number of unstable layers."""
        unstable = sum(1 for s in self.stable.values() if not s)
        if not self.cfg.relax_threshold or unstable == len(self.stable):
            return self.cfg.threshold
        return self.cfg.threshold * RELAX_FACTORS.get(max(unstable, 1), 1.0)

    def observe(self, step: int, sranks: dict[str, float]) -> Optional[Plan]:
        if self.done:
            return None
        values = self._filter(sranks)
        if not self.initialized:
            self.xi = {name: scale_factor(min(m, n), values.get(name)) for name, (m, n) in self.dims.items()}
            self.initialized = True
            return None
        for name, value in values.items():
            if name in self.history:
                self.history[name].append(value)
        bar = self.threshold()
        for name, hist in self.history.items():
            if not self.stable[name]:
                score = stability_score(hist, self.cfg.ema_window, self.cfg.last_k)
                self.stable[name] = score is not None and score < bar
        all_stable = all(self.stable.values())
        forced = self.cfg.max_switch_step is not None and step >= self.cfg.max_switch_step
        if not forced and (step < self.cfg.min_switch_step or not all_stable):
            return None
        self.done = True
        return self._plan(step, forced and not all_stable)

    def choose_rank(self, name: str, srank: float) -> int:
        """The rank rule for one layer at its current srank (see the module docstring)."""
        m, n = self.dims[name]
        full = min(m, n)
        scaled = self.xi.get(name, 1.0) * srank if self.cfg.rank_rule == "scaled" else srank
        floor = max(self.min_rank, math.ceil(self.cfg.floor_fraction * full))
        return max(1, min(full, max(floor, math.ceil(scaled))))

    def quality_floor(self, name: str, srank: float) -> int:
        """The raw rule's rank for one layer, capped at full rank: what the spectrum needs, without ξ."""
        m, n = self.dims[name]
        full = min(m, n)
        floor = max(self.min_rank, math.ceil(self.cfg.floor_fraction * full))
        return max(1, min(full, max(floor, math.ceil(srank))))

    def _plan(self, step: int, forced: bool) -> Plan:
        ranks, reasons, floors = {}, {}, {}
        why = "forced at max_switch_step before all layers were stable" if forced else "all layers stable"
        for name in sorted(self.dims):
            hist = self.history[name]
            if not hist:
                reasons[name] = "kept dense: no finite stable-rank observation"
                continue
            m, n = self.dims[name]
            rank, lowest, capped = self.choose_rank(name, hist[-1]), self.quality_floor(name, hist[-1]), ""
            if not saves_parameters(m, n, rank):
                if not (self.cfg.search_above_saving and self.cfg.rank_rule == "scaled"
                        and saves_parameters(m, n, lowest)):
                    reasons[name] = f"kept dense: rank {rank} saves no parameters for {m}x{n}"
                    continue
                rank, capped = max_saving_rank(m, n), f" {rank} capped at the last rank that saves parameters"
            ranks[name] = rank
            state = "stable" if self.stable[name] else "not stable"
            floor = ""
            if self.cfg.rank_rule == "scaled":
                floors[name] = min(rank, lowest)
                floor = f", floor {floors[name]}"
            rule = f"{self.cfg.rank_rule} rule{capped}"
            reasons[name] = f"rank {rank} ({rule}, srank {hist[-1]:.3f}{floor}, {state}; {why})"
        return Plan("switch", step, ranks, reasons=reasons, floors=floors)

    def state_dict(self) -> dict[str, Any]:
        return {"xi": dict(self.xi), "history": {k: list(v) for k, v in self.history.items()},
                "stable": dict(self.stable), "initialized": self.initialized, "done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.xi = {k: float(v) for k, v in state["xi"].items()}
        self.history = {k: [float(x) for x in v] for k, v in state["history"].items()}
        self.stable = {k: bool(v) for k, v in state["stable"].items()}
        self.initialized, self.done = bool(state["initialized"]), bool(state["done"])
