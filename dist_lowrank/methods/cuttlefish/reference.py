"""`lowrank.cuttlefish.preset: reference` — the published Cuttlefish detector, decision for decision.

What the Cuttlefish code does (its `utils.py`: `rank_estimation`, `layer_rank_stable_detector`,
`exponential_moving_average`; the ResNet-18 / VGG-19 setting), one measurement per epoch, read here as one
measurement per `monitor.cadence_*`:
- stable ranks are truncated to ints, at init too: ξ = min(m, n) / int(srank(W₀));
- the history starts at epoch 0 — the measurement before any training, i.e. the init weights (the epoch −1 init
  measurement itself is not in it); each later measurement is the next epoch;
- no layer is called stable while epoch < window (15);
- the EMA (α = 2/(w+1), e₀ = x₀) is differentiated with `np.gradient` (central differences, one-sided at both
  ends), and the mean of the last `last_k` (11) absolute values is compared with `<=`;
- the threshold is the base until two layers remain unstable (× scaler, 2.5) or one (× 2·scaler), counted before
  the epoch's updates — also on a model with only one or two tracked layers;
- when all layers are stable at epoch e the switch happens at epoch e + 1, with the ranks measured then;
- rank = min(m, n) if int(srank·ξ) > min(m, n), else ceil(srank·ξ) (scaled rule) or srank (raw rule) — also where
  the rank saves no parameters (the reference factorizes every targeted layer).

Where the default strategy (`rule.CuttlefishStrategy`) differs and why: it keeps stable ranks as floats (an int
truncation makes a 1.99 → 2.01 move a full unit, so short histories look unstable), uses backward differences and a
strict `<` (the last difference reacts to the latest change, where the central one lags it by half a step), needs
no full window before calling a layer stable (runs here are hundreds of steps, not hundreds of epochs), relaxes
nothing while no layer is stable (a one-layer model is not a straggler), switches at the detecting measurement
(one cadence of dense training less), and keeps dense the layers whose rank saves no parameters.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from dist_lowrank.methods.cuttlefish.config import CuttlefishConfig
from dist_lowrank.methods.cuttlefish.rule import ema
from dist_lowrank.methods.rule import NonFiniteFilter, Strategy
from dist_lowrank.plan import Plan

SCALER = 2.5  # the reference's __threshold_scaler for ResNet-18 / VGG-19


def gradient_score(history: list[int], window: int, last_k: int) -> float:
    """mean(|np.gradient(EMA(history))|[-last_k:]) — the reference's stability score (history ≥ 2 entries)."""
    return float(np.mean(np.absolute(np.gradient(np.asarray(ema([float(h) for h in history], window))))[-last_k:]))


class ReferenceCuttlefishStrategy(Strategy):
    """Emits one Plan(kind="switch") at the measurement after every layer became stable (see the module docstring)."""

    def __init__(self, cfg: CuttlefishConfig, dims: dict[str, tuple[int, int]], min_rank: int = 1) -> None:
        self.cfg, self.dims = cfg, dict(dims)
        self.xi: dict[str, float] = {}
        self.history: dict[str, list[int]] = {n: [] for n in dims}
        self.stable: dict[str, bool] = {n: False for n in dims}
        self.initialized = self.pending = self.done = False
        self._filter = NonFiniteFilter()

    def threshold(self, remaining: int) -> float:
        base = self.cfg.threshold
        if not self.cfg.relax_threshold:
            return base
        return base * SCALER if remaining == 2 else base * 2 * SCALER if remaining == 1 else base

    def observe(self, step: int, sranks: dict[str, float]) -> Optional[Plan]:
        if self.done:
            return None
        values = {n: int(v) for n, v in self._filter(sranks).items()}
        if not self.initialized:  # epoch −1 for ξ, and epoch 0: the same, untrained weights
            self.xi = {n: min(self.dims[n]) / values[n] if values.get(n) else 1.0 for n in self.dims}
            for name, value in values.items():
                self.history[name].append(value)
            self.initialized = True
            return None
        remaining = sum(1 for s in self.stable.values() if not s)  # counted before this epoch's updates
        for name, value in values.items():
            self.history[name].append(value)
        forced = self.cfg.max_switch_step is not None and step >= self.cfg.max_switch_step
        if self.pending or forced:  # the epoch after all layers became stable (or our forced limit)
            self.done = True
            return self._plan(step, forced and not self.pending)
        for name, hist in self.history.items():
            epoch = len(hist) - 1
            if not self.stable[name] and epoch >= self.cfg.ema_window and len(hist) >= 2:
                self.stable[name] = gradient_score(hist, self.cfg.ema_window, self.cfg.last_k) <= \
                    self.threshold(remaining)
        self.pending = all(self.stable.values()) and step >= self.cfg.min_switch_step
        return None

    def choose_rank(self, name: str, srank: float) -> int:
        full = min(self.dims[name])
        scaled = int(srank) * self.xi.get(name, 1.0)
        if int(scaled) > full:
            return full
        return max(1, math.ceil(scaled) if self.cfg.rank_rule == "scaled" else int(srank))

    def _plan(self, step: int, forced: bool) -> Plan:
        ranks, reasons = {}, {}
        why = "forced at max_switch_step" if forced else "all layers stable at the previous measurement"
        for name in sorted(self.dims):
            hist = self.history[name]
            if not hist:
                reasons[name] = "kept dense: no finite stable-rank observation"
                continue
            ranks[name] = self.choose_rank(name, hist[-1])
            reasons[name] = f"rank {ranks[name]} (reference preset, {self.cfg.rank_rule} rule, srank {hist[-1]}; {why})"
        return Plan("switch", step, ranks, reasons=reasons)

    def state_dict(self) -> dict[str, Any]:
        return {"xi": dict(self.xi), "history": {k: list(v) for k, v in self.history.items()},
                "stable": dict(self.stable), "initialized": self.initialized, "pending": self.pending,
                "done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.xi = {k: float(v) for k, v in state["xi"].items()}
        self.history = {k: [int(x) for x in v] for k, v in state["history"].items()}
        self.stable = {k: bool(v) for k, v in state["stable"].items()}
        self.initialized, self.pending = bool(state["initialized"]), bool(state["pending"])
        self.done = bool(state["done"])


def cuttlefish_strategy(cfg: CuttlefishConfig, dims: dict[str, tuple[int, int]], min_rank: int = 1) -> Strategy:
    """The configured detector: the default strategy, or the published one (`preset: reference`)."""
    from dist_lowrank.methods.cuttlefish.rule import CuttlefishStrategy

    cls = ReferenceCuttlefishStrategy if cfg.preset == "reference" else CuttlefishStrategy
    return cls(cfg, dims, min_rank)
