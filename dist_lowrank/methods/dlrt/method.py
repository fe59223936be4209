"""DLRT as a Method: after every optimizer step the integrator moves each DLRT layer to new bases and a truncated
core (`update`, collective); when a rank outgrows its layer's capacity, or stays well below it for a while, the
capacity changes through the shape-change pipeline (`decide` → `shape_change`: Embed / Slice).

The step itself — cores from full factors or row shards, rank 0's SVDs and truncations in one broadcast, the new
factors and their rotated moments written back — is `step.IntegratorStep`. With start=switch the model
first trains dense: Cuttlefish's detector (stable ranks every cadence, the `lowrank.cuttlefish` section) picks the
step and a rank per layer, the switch (`reshape.switch_change`) writes each weight's truncated SVD into DLRT layers,
and the integrator adapts the ranks from the next step on. A `rank_update` event (ranks, wanted ranks,
capacities, the integrator's bytes) is emitted whenever they change, so the report and TensorBoard draw each
layer's trajectory.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from torch import nn

from dist_lowrank.errors import ConfigError
from dist_lowrank.methods.base import Method, Probe
from dist_lowrank.methods.dlrt.step import IntegratorStep
from dist_lowrank.methods.dlrt.layer import DLRTLinear
from dist_lowrank.methods.cuttlefish.reference import cuttlefish_strategy
from dist_lowrank.methods.rule import Strategy
from dist_lowrank.methods.dlrt.model import check_supported, dlrt_layers, empty_dlrt_like, max_rank_of, to_dlrt
from dist_lowrank.methods.dlrt.reshape import capacity_change, switch_change
from dist_lowrank.methods.dlrt.rule import CapacityRule, capacity_for
from dist_lowrank.methods.switching import cadence_steps
from dist_lowrank.plan import Plan
from dist_lowrank.reshape.change import ShapeChange

class DLRTMethod(Method):
    name = "dlrt"

    def __init__(self, cfg, targets: dict[str, nn.Module], dims: dict[str, tuple[int, int]],
                 finished: bool = False, warmup: Optional[Strategy] = None, cadence: int = 1) -> None:
        super().__init__(cfg, targets, dims)
        self.finished = finished
        self.warmup, self.cadence = warmup, cadence  # start=switch: the dense phase's detector, until the switch
        self.ranks = {} if warmup else {n: m.rank for n, m in targets.items()}
        self.capacities = {} if warmup else {n: m.capacity for n, m in targets.items()}
        self.wanted: dict[str, int] = dict(self.ranks)   # the rank the tolerance asked for at the last step
        self.rule = CapacityRule(cfg.dlrt, dims, {n: max_rank_of(cfg, *d) for n, d in dims.items()})
        self.last_step = 0
        self.integrator_bytes = 0  # this rank's payload in the integrator's collectives, last step
        self.integrator_bytes_total = 0
        self._last_logged: Optional[tuple] = None  # (ranks, wanted, capacities) of the last rank_update event
        self._engine: Any = None   # the engine of the last update (its model after a reshard)

    @classmethod
    def create(cls, cfg, engine: Any, steps_per_epoch: Optional[int] = None, finished: bool = False) -> "DLRTMethod":
        if finished:
            return cls(cfg, {}, {}, finished=True)
        layers = dlrt_layers(engine.unwrapped_model())
        if not layers and cfg.dlrt.start == "switch":  # dense warm-up first
            targets, dims = cls.select(cfg, engine.unwrapped_model(), engine)
            for name, module in targets.items():
                check_supported(name, module)
            return cls(cfg, targets, dims, warmup=cuttlefish_strategy(cfg.cuttlefish, dims, cfg.min_rank),
                       cadence=cadence_steps(cfg, steps_per_epoch))
        if not layers:
            raise ConfigError("lowrank.strategy: 'dlrt' needs a model converted with dist_lowrank.prepare_model "
                              "(or methods.dlrt.model.to_dlrt) before the engine is built")
        method = cls(cfg, dict(layers), {n: (m.out_features, m.in_features) for n, m in layers.items()})
        method.set_modes(layers.values())
        return method

    @classmethod
    def prepare_model(cls, model: nn.Module, cfg) -> nn.Module:
        return model if cfg.dlrt.start == "switch" else to_dlrt(model, cfg)

    @classmethod
    def layer_for_layout(cls, module: nn.Module, entry: dict) -> Optional[nn.Module]:
        if entry.get("type") != DLRTLinear.LAYOUT_TYPE:
            return None
        reference = next(module.parameters())
        return empty_dlrt_like(module, int(entry["rank"]), int(entry["capacity"]), device=reference.device,
                               dtype=reference.dtype)

    @classmethod
    def check_run(cls, cfg, sharded_parameters: bool) -> None:
        if cfg.dlrt.integrate_every > 1 and cfg.dlrt.integrator == "kls":
            raise ConfigError("lowrank.dlrt.integrate_every: > 1 needs integrator 'parallel' (KLS's core block is "
                              "the step's own activations)")
        if cfg.dlrt.min_rank > cfg.dlrt.init_rank:
            raise ConfigError(f"lowrank.dlrt.min_rank: {cfg.dlrt.min_rank} > init_rank {cfg.dlrt.init_rank}")
        if cfg.dlrt.max_rank is not None and cfg.dlrt.max_rank < cfg.dlrt.min_rank:
            raise ConfigError(f"lowrank.dlrt.max_rank: {cfg.dlrt.max_rank} < min_rank {cfg.dlrt.min_rank}")

    @property
    def done(self) -> bool:
        return self.finished

    def set_modes(self, layers) -> None:
        """What the layers' backward keeps (KLS: each step's (x, gy) pairs) and whether only S still trains; set
        again after every reshard (new modules)."""
        for layer in layers:
            layer.record = self.cfg.dlrt.integrator == "kls" and not self.finished
            layer.s_only = self.finished
            if not layer.record:
                layer.records = None

    # -- every step ------------------------------------------------------------------------------------
    def start(self, probe: Probe) -> None:
        if self.warmup is not None:  # Cuttlefish's init measurement
            self.warmup.observe(0, probe.stable_ranks(0, list(self.targets)))

    def update(self, step: int, probe: Probe) -> None:
        self._engine = probe.engine
        if self.warmup is not None:
            return  # still dense: the optimizer's step is the whole step
        if step % self.cfg.dlrt.integrate_every and not self._adapting_ends(step):
            self.integrator_bytes = 0
            return  # K, L, S took their optimizer step on the current bases; the integrator runs every n steps
        start = time.perf_counter()
        self.last_step = step
        layers = dlrt_layers(probe.engine.unwrapped_model())
        names = sorted(self.targets)
        stepper = IntegratorStep(self.cfg, self.dims, probe.engine, probe.coordinator)
        for name, (rank, wanted, capacity) in stepper.run(names, layers).items():
            self.ranks[name], self.wanted[name] = rank, wanted
            self.rule.observe(name, rank, capacity)
        self.integrator_bytes = stepper.bytes
        if self._adapting_ends(step):  # the paper's fine-tuning phase: bases fixed, only S trains
            self.finished = True
            self.set_modes(layers.values())
        self.integrator_bytes_total += self.integrator_bytes
        state = (dict(self.ranks), dict(self.wanted), dict(self.capacities))
        if state != self._last_logged:  # trajectories are piecewise constant: log their changes, not every step
            self._last_logged = state
            probe.emit({"event": "rank_update", "step": step, "ranks": state[0], "wanted": state[1],
                        "capacities": state[2], "integrator_bytes": self.integrator_bytes,
                        "integrator_bytes_total": self.integrator_bytes_total, "by_rows": stepper.by_rows,
                        "seconds": time.perf_counter() - start})

    def _adapting_ends(self, step: int) -> bool:
        return self.cfg.dlrt.adaptive_steps is not None and step >= self.cfg.dlrt.adaptive_steps

    def due(self, step: int) -> bool:
        if self.warmup is not None:
            return step % self.cadence == 0
        return step % self.cfg.dlrt.integrate_every == 0 or self._adapting_ends(step)

    def measure(self, step: int, probe: Probe) -> dict[str, Any]:
        if self.warmup is not None:
            return probe.stable_ranks(step, list(self.targets))
        return dict(self.wanted)

    def decide(self, step: int, measurement: dict[str, Any]) -> Optional[Plan]:
        if self.warmup is not None:
            return self._switch_plan(step, measurement)
        return self.rule.decide(step, measurement, dict(self.ranks), dict(self.capacities))

    def _switch_plan(self, step: int, sranks: dict[str, float]) -> Optional[Plan]:
        """Cuttlefish's switch decision, every target included: its rank rule on the last stable rank (where it
        would keep a layer dense, the rule's rank all the same: DLRT adapts it), clamped to [min_rank, max_rank]."""
        plan = self.warmup.observe(step, sranks)
        if plan is None:
            return None
        cfg, ranks, capacities = self.cfg.dlrt, {}, {}
        for name, (m, n) in sorted(self.dims.items()):
            history = self.warmup.history[name]
            rank = plan.ranks.get(name) or (self.warmup.choose_rank(name, history[-1]) if history else cfg.init_rank)
            top = max_rank_of(self.cfg, m, n)
            ranks[name] = max(min(rank, top), min(cfg.min_rank, top))
            capacities[name] = capacity_for(ranks[name], m, n, cfg.growth_factor, cfg.capacity_multiple, top)
        return Plan("switch", step, ranks, capacities=capacities, reasons=dict(plan.reasons))

    def shape_change(self, plan: Plan, model: nn.Module) -> Optional[ShapeChange]:
        if plan.kind == "switch":
            return switch_change(model, dict(plan.ranks), {n: plan.capacities[n] for n in plan.ranks}, plan.step)
        return capacity_change(dlrt_layers(model), dict(plan.ranks), dict(plan.capacities), plan.step)

    def committed(self, plan: Plan, measurements: dict[str, Any]) -> dict[str, Any]:
        if plan.kind == "switch":
            return self._switched(plan, measurements)
        self.capacities.update(plan.capacities)
        self.rule.resized(plan.capacities)
        self.set_modes(dlrt_layers(self._engine.unwrapped_model()).values())  # the reshard made new modules
        return {"ranks": dict(plan.ranks), "capacities": dict(plan.capacities), "measurements": measurements}

    def _switched(self, plan: Plan, measurements: dict[str, Any]) -> dict[str, Any]:
        """The dense phase is over: the switched layers are the targets from now on (a layer the switch's speed
        filter kept dense stays dense and untracked)."""
        layers = dlrt_layers(self._engine.unwrapped_model())
        dims = {n: list(self.dims[n]) for n in plan.ranks}
        self.targets = {n: layers[n] for n in plan.ranks}
        self.dims = {n: self.dims[n] for n in plan.ranks}
        self.ranks, self.capacities = dict(plan.ranks), {n: plan.capacities[n] for n in plan.ranks}
        self.wanted = dict(self.ranks)
        self.rule = CapacityRule(self.cfg.dlrt, self.dims, {n: max_rank_of(self.cfg, *d) for n, d in self.dims.items()})
        self.warmup = None
        self.set_modes(self.targets.values())
        return {"ranks": dict(plan.ranks), "capacities": dict(self.capacities), "reasons": dict(plan.reasons),
                "dims": dims, "measurements": measurements}

    # -- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.warmup is not None:
            return {"warmup": self.warmup.state_dict()}
        return {"wanted": dict(self.wanted), "last_step": self.last_step, **self.rule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.warmup is not None:
            self.warmup.load_state_dict(state["warmup"])
            return
        self.wanted.update(state.get("wanted", {}))
        self.rule.load_state_dict(state)
        self.last_step = int(state.get("last_step", 0))
