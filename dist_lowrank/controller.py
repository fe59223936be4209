"""The loop glue: method → coordinator → engine, called once per optimizer step.

The controller knows no engine internals (the backend does), no decision rule and no method (`methods/` does: it
reaches the configured one through `methods.build_method` and the `methods.base.Method` protocol). It owns the
finite-step filter, the agreement on every plan, the layer-speed check before a switch, the barrier before every
reshard, and the event log that telemetry and checkpoints read.
"""
from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import replace
from typing import Any, Callable, Optional

import torch

from dist_lowrank.backends.base import Backend
from dist_lowrank.config import LowRankConfig
from dist_lowrank.coordinator import Coordinator
from dist_lowrank.device import default_device
from dist_lowrank.faults import maybe_fault
from dist_lowrank.methods import build_method, check_run
from dist_lowrank.methods.base import Probe
from dist_lowrank.monitor import RankMonitor
from dist_lowrank.plan import Plan
from dist_lowrank.profiling import Timer, keep_dense_where_not_faster, record_input_shapes, time_module
from dist_lowrank.rank_alignment import align_plan
from dist_lowrank.speed_table import SpeedTable, table_timer

log = logging.getLogger("dist_lowrank")


class LowRankController:
    """Decides and carries out rank changes for one backend, identically on every rank."""

    def __init__(self, backend: Backend, cfg: LowRankConfig, steps_per_epoch: Optional[int] = None,
                 on_event: Optional[Callable[[dict[str, Any]], None]] = None,
                 resume_state: Optional[dict[str, Any]] = None, telemetry: Optional[Any] = None) -> None:
        """resume_state: a checkpoint's `state_dict()`; after a finished method (e.g. past the switch) the targets
        are changed already, so nothing is selected and only the ranks are restored.
        telemetry: a telemetry.session.RunTelemetry that `after_step` feeds and that logs every event."""
        self.backend, self.cfg = backend, cfg
        self.on_event = on_event or (lambda event: None)
        self.telemetry = telemetry
        finished = bool(resume_state and resume_state.get("finished"))
        check_run(cfg, sharded_parameters=backend.shards_parameters)  # the library path's one-line refusals too
        self.method = build_method(cfg, backend, steps_per_epoch=steps_per_epoch, finished=finished)
        self.monitor = RankMonitor(cfg.monitor.method, cfg.monitor.steps, rtol=cfg.monitor.rtol, seed=cfg.seed)
        self.coordinator = Coordinator()
        self.timer: Timer = time_module
        if cfg.switch.speed_table and cfg.switch.profile_layers and not finished:
            with self.coordinator.shared_failure(f"reading switch.speed_table {cfg.switch.speed_table}"):
                self.timer = table_timer(SpeedTable.load(cfg.switch.speed_table))
        self.probe = Probe(backend, self.monitor, self.coordinator, self._emit)
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.skipped_steps = 0
        self.events: list[dict[str, Any]] = []
        if resume_state is not None:
            self.load_state_dict(resume_state)

    # -- what the method holds, for callers that report it -------------------------------------------
    @property
    def names(self) -> list[str]:
        """The layers the method was built over."""
        return list(self.method.names) if self.method is not None else []

    @property
    def ranks(self) -> dict[str, int]:
        return self.method.ranks if self.method is not None else {}

    @property
    def capacities(self) -> dict[str, int]:
        return self.method.capacities if self.method is not None else {}

    @property
    def last_estimate(self) -> dict[str, float]:
        return self.probe.last_estimate

    @property
    def active(self) -> bool:
        """True while the method may still change ranks."""
        return self.method is not None and not self.method.done

    def record_shapes(self):
        """Context manager: wrap one forward pass so the switch can time layers at real shapes."""
        if not self.active or self.input_shapes:
            return nullcontext()
        return record_input_shapes(self.backend.unwrapped_model(), self.names, self.input_shapes)

    def estimate(self, step: int) -> dict[str, float]:
        """Collective: stable rank of every watched layer, rank 0's values on every rank."""
        return self.probe.stable_ranks(step, self.names)

    def start(self) -> None:
        """Once before the first training step (Cuttlefish: the init measurement)."""
        if self.active:
            self.method.start(self.probe)

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
        self.method.update(step, self.probe)
        if not self.method.due(step):
            return None
        plan = self.coordinator.agree(self.method.decide(step, self.method.measure(step, self.probe)))
        if plan is None:
            return None
        return self.execute(plan)

    def execute(self, plan: Plan) -> Plan:
        """Carry out an agreed plan (collective): a switch is first filtered by measured layer speed; the method
        describes the change, the engine reshards (after a barrier), the method records it, the event is logged."""
        timing: dict[str, Any] = {}
        if plan.kind == "switch":
            plan = replace(align_plan(plan, self.method.targets, self.cfg.switch.rank_multiple),
                           factor_moments=self.cfg.switch.factor_moments, lr_scale=self.cfg.switch.lr_scale)
            if self.cfg.switch.profile_layers and plan.ranks:
                plan, timing = keep_dense_where_not_faster(
                    plan, self.method.targets, self.input_shapes, self.cfg.switch.profile_iters,
                    self.cfg.switch.min_speedup, default_device(), seed=self.cfg.seed,
                    rank_search=self.cfg.switch.rank_search, timer=self.timer,
                    scope=self.cfg.switch.speedup_scope)
                plan = self.coordinator.agree(plan)
        for name, reason in sorted(plan.reasons.items()):
            log.info("%s: %s", name, reason)
        maybe_fault("switch", plan.step)
        change = self.method.shape_change(plan, self.backend.unwrapped_model())
        measurements: dict[str, Any] = {}
        if change is not None and change.layers:
            self.coordinator.arrive(f"{change.kind} at step {plan.step}", self.cfg.switch.barrier_timeout_s)
            measurements = dict(self.backend.apply(change))
            measurements = {"per_rank": self.coordinator.gather_objects(measurements), **measurements}
        event = {"event": plan.kind, "step": plan.step, **self.method.committed(plan, measurements)}
        if timing or plan.kind == "switch":
            event["timing"] = timing
        self._emit(event)
        return plan

    # -- around backward ---------------------------------------------------------------------------------
    def regularize(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss with the method's term from the forward (every engine) and its penalty where the engine owns
        the gradients (ZeRO); call before backward."""
        if self.method is None:
            return loss
        term = self.method.loss_term(self.backend.unwrapped_model())
        if term is not None:
            loss = loss + term.to(loss.dtype)
        if not self.backend.owns_gradients:
            return loss
        return self.method.regularize(loss, self.backend.unwrapped_model())

    def after_backward(self) -> None:
        """The method's gradient terms where gradients are plain `.grad` tensors; call after backward."""
        if self.method is not None and not self.backend.owns_gradients:
            self.method.after_backward(self.backend.unwrapped_model())

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
        """What a resumed run needs to make the same decisions (method state, ranks, counters)."""
        method = self.method
        return {"strategy": method.state_dict() if method is not None and not method.finished else None,
                "ranks": dict(self.ranks), "capacities": dict(self.capacities), "skipped_steps": self.skipped_steps,
                "finished": not self.active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.method is not None:
            if state.get("strategy") is not None and not self.method.finished:
                self.method.load_state_dict(state["strategy"])
            self.method.ranks = dict(state.get("ranks", {}))
            self.method.capacities = dict(state.get("capacities", {}))
        self.skipped_steps = int(state.get("skipped_steps", 0))
