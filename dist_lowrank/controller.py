"""The loop glue: monitor → strategy → coordinator → backend, called once per optimizer step.

The controller knows no engine internals (the backend does) and no decision rules (the strategy
does). It owns the cadence, the finite-step filter, the layer-speed check at the switch, and the
event log that telemetry and checkpoints read.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Optional
from dataclasses import replace

import torch

from dist_lowrank.backends.base import Backend
from dist_lowrank.backends.ds_memory import RssPeak
from dist_lowrank.config import LowRankConfig
from dist_lowrank.coordinator import Coordinator
from dist_lowrank.device import default_device
from dist_lowrank.errors import ConfigError
from dist_lowrank.faults import maybe_fault
from dist_lowrank.inrank_model import inrank_layers
from dist_lowrank.monitor import RankMonitor
from dist_lowrank.plan import Plan
from dist_lowrank.profiling import keep_dense_where_not_faster, record_input_shapes
from dist_lowrank.spectrum import lowrank_singular_values
from dist_lowrank.strategies import build_strategy
from dist_lowrank.strategies.inrank import trained_width
from dist_lowrank.targeting import select_targets

log = logging.getLogger("dist_lowrank")


class LowRankController:
    """Decides and carries out rank changes for one backend, identically on every rank."""

    def __init__(self, backend: Backend, cfg: LowRankConfig, steps_per_epoch: Optional[int] = None,
                 on_event: Optional[Callable[[dict[str, Any]], None]] = None,
                 resume_state: Optional[dict[str, Any]] = None, telemetry: Optional[Any] = None) -> None:
        """resume_state: a checkpoint's `state_dict()`; after a finished strategy (e.g. past the switch) the
        targets are factorized already, so nothing is selected and only the ranks are restored.
        telemetry: a telemetry.session.RunTelemetry that `after_step` feeds and that logs every event."""
        self.backend, self.cfg = backend, cfg
        self.on_event = on_event or (lambda event: None)
        self.telemetry = telemetry
        model = backend.unwrapped_model()
        self.inrank = cfg.strategy == "inrank"
        self.capacities: dict[str, int] = {}
        finished = bool(resume_state and resume_state.get("finished"))
        if finished:
            self.modules, self.dims = {}, {}
        elif self.inrank:
            layers = inrank_layers(model)
            if not layers:
                raise ConfigError("lowrank.strategy: 'inrank' needs a model converted with "
                                  "dist_lowrank.inrank_model.to_inrank before the engine is built")
            self.modules = dict(layers)
            self.dims = {n: (m.out_features, m.in_features) for n, m in layers.items()}
            self.capacities = {n: m.capacity for n, m in layers.items()}
        else:
            self.modules = select_targets(model, cfg.target_modules, cfg.exclude_modules)
            self.dims = {v.name: tuple(v.dims) for v in backend.shard_views(list(self.modules))}
        self.names = list(self.modules)
        self.strategy = None if finished else build_strategy(cfg, self.dims)
        self.monitor = RankMonitor(cfg.monitor.method, cfg.monitor.steps, rtol=cfg.monitor.rtol, seed=cfg.seed)
        self.coordinator = Coordinator()
        self.cadence = self._cadence_steps(cfg, steps_per_epoch)
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.skipped_steps = 0
        self.ranks: dict[str, int] = {n: cfg.inrank.init_rank for n in self.modules} if self.inrank else {}
        self.events: list[dict[str, Any]] = []
        self.last_estimate: dict[str, float] = {}
        if resume_state is not None:
            self.load_state_dict(resume_state)

    @staticmethod
    def _cadence_steps(cfg: LowRankConfig, steps_per_epoch: Optional[int]) -> int:
        if cfg.monitor.cadence_epochs is not None:
            if not steps_per_epoch:
                raise ValueError("lowrank.monitor.cadence_epochs needs the run's steps_per_epoch")
            return max(1, round(cfg.monitor.cadence_epochs * steps_per_epoch))
        return cfg.monitor.cadence_steps

    @property
    def active(self) -> bool:
        """True while the strategy may still change ranks."""
        return self.strategy is not None and not getattr(self.strategy, "done", False)

    def record_shapes(self):
        """Context manager: wrap one forward pass so the switch can time layers at real shapes."""
        if not self.active or self.input_shapes:
            from contextlib import nullcontext

            return nullcontext()
        return record_input_shapes(self.backend.unwrapped_model(), self.names, self.input_shapes)

    def estimate(self, step: int) -> dict[str, float]:
        """Collective: stable rank of every target, rank 0's values on every rank."""
        start = time.perf_counter()
        results = self.monitor.estimate(self.backend.shard_views(self.names))
        values = self.coordinator.broadcast_values({n: r.value for n, r in results.items()})
        self.last_estimate = values
        self._emit({"event": "estimate", "step": step, "sranks": values, "seconds": time.perf_counter() - start,
                    "monitor_bytes": self.monitor.stats.bytes, "monitor_collectives": self.monitor.stats.collectives})
        return values

    def start(self) -> None:
        """The init measurement (Cuttlefish's epoch −1): call once before the first training step."""
        if self.active and not self.inrank:
            self.strategy.observe(0, self.estimate(0))

    def after_step(self, step: int, loss: float) -> Optional[Plan]:
        """Call after each optimizer step (all ranks). Returns the plan carried out, if any. With telemetry,
        the step's traffic and time are recorded first and the controller's own work is not counted."""
        if self.telemetry is None:
            return self._after_step(step, loss)
        self.telemetry.end_step(step, loss)
        plan = self._after_step(step, loss)
        self.telemetry.after_controller(step, plan)
        return plan

    def _after_step(self, step: int, loss: float) -> Optional[Plan]:
        if not self.active:
            return None
        finite = self.coordinator.all_true(loss is not None and math.isfinite(float(loss)))
        if not finite:
            self.skipped_steps += 1
            self._emit({"event": "skipped_nonfinite", "step": step})
            return None
        if self.inrank:
            return self._inrank_step(step)
        if step % self.cadence:
            return None
        plan = self.coordinator.agree(self.strategy.observe(step, self.estimate(step)))
        if plan is None:
            return None
        return self.execute(plan)

    def spectrum(self, step: int) -> dict[str, torch.Tensor]:
        """Collective: σ(U Vᵀ) of every InRank layer from r×r Grams of the shards; rank 0's values."""
        start = time.perf_counter()
        u_views = self.backend.param_views([f"{n}.u" for n in self.names])
        v_views = self.backend.param_views([f"{n}.v" for n in self.names])
        widths = [m.rank for m in inrank_layers(self.backend.unwrapped_model()).values()]
        values, stats = lowrank_singular_values(u_views, v_views, widths)
        flat = {f"{n}#{i}": float(x) for n, vals in zip(self.names, values) for i, x in enumerate(vals.tolist())}
        shared = self.coordinator.broadcast_values(flat)
        svals = {n: torch.tensor([shared[f"{n}#{i}"] for i in range(len(vals))], dtype=torch.float64)
                 for n, vals in zip(self.names, values)}
        self._emit({"event": "spectrum", "step": step, "seconds": time.perf_counter() - start,
                    "gram_bytes": stats.bytes, "gram_collectives": stats.collectives,
                    "ranks": dict(self.ranks), "capacities": dict(self.capacities)})
        return svals

    def _inrank_step(self, step: int) -> Optional[Plan]:
        rule = self.strategy
        check = rule.is_check_step(step)
        fix_due = rule.cfg.fix_after is not None and step >= rule.cfg.fix_after
        if not (check or fix_due):
            return None
        svals = self.spectrum(step) if check and not fix_due else {}
        plan = self.coordinator.agree(rule.decide(step, svals, dict(self.ranks), dict(self.capacities)))
        if plan is None:
            return None
        if plan.kind == "grow":
            widths = {n: trained_width(rule.cfg, r, *self.dims[n]) for n, r in plan.ranks.items()}
            modules = inrank_layers(self.backend.unwrapped_model())
            for name, width in widths.items():
                if name not in plan.capacities:
                    modules[name].grow(width)  # within capacity: no tensor changes, no reshard
            measurements = {}
            if plan.capacities:
                self.coordinator.arrive(f"growth reshard at step {step}", self.cfg.switch.barrier_timeout_s)
                measurements = self._measured_execute(Plan("grow", step, {n: widths[n] for n in plan.capacities},
                                                                   capacities=dict(plan.capacities)))
            self.capacities.update(plan.capacities)
        elif rule.cfg.fold_on_fix:  # efficient InRank: W0 + U Vᵀ becomes a pure factorization at rank r
            measurements = self._measured_execute(Plan("switch", step, dict(plan.ranks)))
        else:
            measurements = {}
        self.ranks.update(plan.ranks)
        self._emit({"event": plan.kind, "step": step, "ranks": dict(plan.ranks), "capacities": dict(plan.capacities),
                    "reshards": len(plan.capacities), "measurements": measurements})
        return plan

    def execute(self, plan: Plan) -> Plan:
        """Filter the plan by measured layer speed, then have the backend reshard (collective)."""
        timing: dict[str, Any] = {}
        plan = replace(plan, factor_moments=self.cfg.switch.factor_moments, lr_scale=self.cfg.switch.lr_scale)
        if plan.kind == "switch" and self.cfg.switch.profile_layers and plan.ranks:
            plan, timing = keep_dense_where_not_faster(
                plan, self.modules, self.input_shapes, self.cfg.switch.profile_iters, self.cfg.switch.min_speedup,
                default_device(), seed=self.cfg.seed, rank_search=self.cfg.switch.rank_search)
            plan = self.coordinator.agree(plan)
        for name, reason in sorted(plan.reasons.items()):
            log.info("%s: %s", name, reason)
        maybe_fault("switch", plan.step)
        self.coordinator.arrive(f"switch at step {plan.step}", self.cfg.switch.barrier_timeout_s)
        measurements = self._measured_execute(plan) if plan.ranks else {}
        measurements = {"per_rank": self.coordinator.gather_objects(measurements), **measurements}
        self.ranks.update(plan.ranks)
        self.modules = {n: m for n, m in self.modules.items() if n not in plan.ranks}
        self._emit({"event": plan.kind, "step": plan.step, "ranks": dict(plan.ranks), "reasons": dict(plan.reasons),
                    "dims": {n: list(self.dims[n]) for n in set(plan.ranks) | set(plan.reasons) if n in self.dims},
                    "timing": timing, "measurements": measurements})
        return plan

    def regularize(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss with the method's penalty where the engine owns the gradients (ZeRO); call before backward."""
        decay = self.cfg.cuttlefish.frobenius_decay if self.ranks else 0.0
        if decay > 0 and self.backend.owns_gradients:
            from dist_lowrank.layers import frobenius_penalty

            return loss + frobenius_penalty(self.backend.unwrapped_model(), decay)
        return loss

    def after_backward(self) -> None:
        """The method's gradient terms where gradients are plain `.grad` tensors; call after backward."""
        decay = self.cfg.cuttlefish.frobenius_decay if self.ranks else 0.0
        if decay > 0 and not self.backend.owns_gradients:
            from dist_lowrank.layers import frobenius_decay_

            frobenius_decay_(self.backend.unwrapped_model(), decay)

    def _measured_execute(self, plan: Plan) -> dict[str, Any]:
        """backend.execute with the peak RSS *during* the reshard above the RSS before it, on every backend
        (the process's lifetime peak, ru_maxrss, usually hides it)."""
        with RssPeak() as rss:
            measurements = dict(self.backend.execute(plan))
        measurements.setdefault("peak_rss_delta_mb", rss.delta_mb)
        return measurements

    def _emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.on_event(event)
        if self.telemetry is not None:
            self.telemetry.log(event)

    def close(self) -> Optional[dict[str, Any]]:
        """With telemetry (all ranks together): log the last partial window, write the summary and the report;
        returns the summary. Optional: without it they are written at exit, the partial window left out."""
        return self.telemetry.close() if self.telemetry is not None else None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to make the same decisions (strategy state, ranks, counters)."""
        return {"strategy": self.strategy.state_dict() if self.strategy else None, "ranks": dict(self.ranks),
                "capacities": dict(self.capacities), "skipped_steps": self.skipped_steps,
                "finished": not self.active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.strategy is not None and state.get("strategy") is not None:
            self.strategy.load_state_dict(state["strategy"])
        self.ranks = dict(state.get("ranks", {}))
        self.capacities = dict(state.get("capacities", {}))
        self.skipped_steps = int(state.get("skipped_steps", 0))
