"""Methods that switch once from dense to factorized layers, decided on stable ranks (Cuttlefish, fixed ratio).

They share the measurement (the shard-aware stable-rank monitor, every `monitor.cadence_*`), the init measurement
before training, and the change (`reshape.builders.switch_change`: each layer's truncated SVD); only the rule differs.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from dist_lowrank.methods.base import Method, Probe
from dist_lowrank.plan import Plan
from dist_lowrank.reshape.builders import switch_change
from dist_lowrank.reshape.change import ShapeChange


def cadence_steps(cfg, steps_per_epoch: Optional[int]) -> int:
    """Optimizer steps between two measurements (`lowrank.monitor.cadence_steps`, or `cadence_epochs`)."""
    if cfg.monitor.cadence_epochs is not None:
        if not steps_per_epoch:
            raise ValueError("lowrank.monitor.cadence_epochs needs the run's steps_per_epoch")
        return max(1, round(cfg.monitor.cadence_epochs * steps_per_epoch))
    return cfg.monitor.cadence_steps


class SwitchMethod(Method):
    """One switch, planned by `self.rule` (a methods.rule.Strategy fed with stable ranks)."""

    def __init__(self, cfg, targets: dict[str, nn.Module], dims: dict[str, tuple[int, int]], rule: Any,
                 cadence: int, finished: bool = False) -> None:
        super().__init__(cfg, targets, dims)
        self.rule, self.cadence, self.finished = rule, cadence, finished

    @classmethod
    def create(cls, cfg, engine: Any, steps_per_epoch: Optional[int] = None, finished: bool = False) -> "SwitchMethod":
        targets, dims = ({}, {}) if finished else cls.select(cfg, engine.unwrapped_model(), engine)
        return cls(cfg, targets, dims, cls.make_rule(cfg, dims), cadence_steps(cfg, steps_per_epoch), finished)

    @classmethod
    def make_rule(cls, cfg, dims: dict[str, tuple[int, int]]) -> Any:
        raise NotImplementedError

    @property
    def done(self) -> bool:
        return self.finished or self.rule.done

    def start(self, probe: Probe) -> None:
        """The init measurement (Cuttlefish's epoch −1: ξ = full rank / srank(W₀))."""
        if not self.done:
            self.rule.observe(0, probe.stable_ranks(0, list(self.targets)))

    def due(self, step: int) -> bool:
        return step % self.cadence == 0

    def measure(self, step: int, probe: Probe) -> dict[str, float]:
        return probe.stable_ranks(step, list(self.targets))

    def decide(self, step: int, measurement: dict[str, float]) -> Optional[Plan]:
        return self.rule.observe(step, measurement)

    def shape_change(self, plan: Plan, model: nn.Module) -> Optional[ShapeChange]:
        if not plan.ranks:
            return None
        return switch_change(dict(model.named_modules()), dict(plan.ranks), plan.step, plan.factor_moments,
                             plan.lr_scale)

    def committed(self, plan: Plan, measurements: dict[str, Any]) -> dict[str, Any]:
        self.ranks.update(plan.ranks)
        dims = {n: list(self.dims[n]) for n in set(plan.ranks) | set(plan.reasons) if n in self.dims}
        self.targets = {n: m for n, m in self.targets.items() if n not in plan.ranks}
        return {"ranks": dict(plan.ranks), "reasons": dict(plan.reasons), "dims": dims, "measurements": measurements}

    def state_dict(self) -> dict[str, Any]:
        return self.rule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state)
