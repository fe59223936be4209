"""InRank as a Method: every `gap` steps the spectrum of each layer's U Vᵀ (from r×r Grams of the shards) decides
how far its rank grows; growth inside the allocated capacity changes no tensor, growth past it is a reshard
(`reshape`); efficient InRank fixes the ranks at `fix_after` (and may fold W0 + U Vᵀ into a plain factorization)."""
from __future__ import annotations

import time
from typing import Any, Optional

import torch
from torch import nn

from dist_lowrank.errors import ConfigError
from dist_lowrank.methods.base import Method, Probe
from dist_lowrank.methods.inrank.model import inrank_layers, to_inrank
from dist_lowrank.methods.inrank.reshape import fold_change, growth_change
from dist_lowrank.methods.inrank.rule import InRankGrowthRule, trained_width
from dist_lowrank.methods.inrank.spectrum import lowrank_singular_values
from dist_lowrank.plan import Plan
from dist_lowrank.reshape.change import ShapeChange


class InRankMethod(Method):
    name = "inrank"

    def __init__(self, cfg, targets: dict[str, nn.Module], dims: dict[str, tuple[int, int]],
                 finished: bool = False) -> None:
        super().__init__(cfg, targets, dims)
        self.rule, self.finished = InRankGrowthRule(cfg.inrank, dims), finished
        self.ranks = {n: cfg.inrank.init_rank for n in targets}
        self.capacities = {n: m.capacity for n, m in targets.items()}

    @classmethod
    def create(cls, cfg, engine: Any, steps_per_epoch: Optional[int] = None, finished: bool = False) -> "InRankMethod":
        if finished:
            return cls(cfg, {}, {}, finished=True)
        layers = inrank_layers(engine.unwrapped_model())
        if not layers:
            raise ConfigError("lowrank.strategy: 'inrank' needs a model converted with "
                              "dist_lowrank.methods.inrank.model.to_inrank before the engine is built")
        return cls(cfg, dict(layers), {n: (m.out_features, m.in_features) for n, m in layers.items()})

    @classmethod
    def prepare_model(cls, model: nn.Module, cfg) -> nn.Module:
        return to_inrank(model, cfg)

    @property
    def done(self) -> bool:
        return self.finished or self.rule.done

    def _fix_due(self, step: int) -> bool:
        return self.cfg.inrank.fix_after is not None and step >= self.cfg.inrank.fix_after

    def due(self, step: int) -> bool:
        return self.rule.is_check_step(step) or self._fix_due(step)

    def measure(self, step: int, probe: Probe) -> dict[str, torch.Tensor]:
        return self.spectrum(step, probe) if self.rule.is_check_step(step) and not self._fix_due(step) else {}

    def spectrum(self, step: int, probe: Probe) -> dict[str, torch.Tensor]:
        """Collective: σ(U Vᵀ) of every InRank layer from r×r Grams of the shards; rank 0's values."""
        start = time.perf_counter()
        names = list(self.targets)
        u_views = probe.engine.param_views([f"{n}.u" for n in names])
        v_views = probe.engine.param_views([f"{n}.v" for n in names])
        widths = [m.rank for m in inrank_layers(probe.engine.unwrapped_model()).values()]
        values, stats = lowrank_singular_values(u_views, v_views, widths)
        flat = {f"{n}#{i}": float(x) for n, vals in zip(names, values) for i, x in enumerate(vals.tolist())}
        shared = probe.coordinator.broadcast_values(flat)
        svals = {n: torch.tensor([shared[f"{n}#{i}"] for i in range(len(vals))], dtype=torch.float64)
                 for n, vals in zip(names, values)}
        probe.emit({"event": "spectrum", "step": step, "seconds": time.perf_counter() - start,
                    "gram_bytes": stats.bytes, "gram_collectives": stats.collectives,
                    "ranks": dict(self.ranks), "capacities": dict(self.capacities)})
        return svals

    def decide(self, step: int, measurement: dict[str, torch.Tensor]) -> Optional[Plan]:
        return self.rule.decide(step, measurement, dict(self.ranks), dict(self.capacities))

    def shape_change(self, plan: Plan, model: nn.Module) -> Optional[ShapeChange]:
        """Growth: layers that still fit their capacity grow in place (no tensor changes); the others are a
        reshard. Fix: with fold_on_fix, W0 + U Vᵀ becomes a pure factorization at rank r (a reshard)."""
        modules = inrank_layers(model)
        if plan.kind == "grow":
            widths = {n: trained_width(self.cfg.inrank, r, *self.dims[n]) for n, r in plan.ranks.items()}
            for name, width in widths.items():
                if name not in plan.capacities:
                    modules[name].grow(width)
            if not plan.capacities:
                return None
            return growth_change(modules, {n: widths[n] for n in plan.capacities}, dict(plan.capacities), plan.step)
        if plan.kind == "fix" and self.cfg.inrank.fold_on_fix:
            return fold_change(modules, dict(plan.ranks), plan.step)
        return None

    def committed(self, plan: Plan, measurements: dict[str, Any]) -> dict[str, Any]:
        self.capacities.update(plan.capacities)
        self.ranks.update(plan.ranks)
        return {"ranks": dict(plan.ranks), "capacities": dict(plan.capacities), "reshards": len(plan.capacities),
                "measurements": measurements}

    def state_dict(self) -> dict[str, Any]:
        return self.rule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state)
