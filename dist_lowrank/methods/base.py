"""What the controller needs from a low-rank method — and nothing more, so it never names one.

A method (one folder under `methods/`) has a config section, its layers, what it measures every cadence, its
decision rule and its state. Per optimizer step the controller runs `update(step, probe)` (a method that moves the
weights itself), then asks `due(step)`; when due, `measure(step, probe)`
(collective: every rank calls it and gets the same values) and `decide(step, measurement)` (pure) give an optional
`Plan`; once every rank agreed on it, `shape_change(plan, model)` describes it for the engines (`reshape.change`)
and `committed(plan, measurements)` updates the method's own state and says what to log.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import torch
from torch import nn

from dist_lowrank.plan import Plan

if TYPE_CHECKING:
    from dist_lowrank.config import LowRankConfig
    from dist_lowrank.reshape.change import ShapeChange


class Probe:
    """What a method may measure with: the engine's shard views, the stable-rank monitor, agreement, the event log.
    `engine` is duck-typed (param_views, shard_views, unwrapped_model; gather, full_state, write and optimizer for
    methods that move weights themselves): methods never import a backend."""

    def __init__(self, engine: Any, monitor: Any, coordinator: Any, emit: Callable[[dict[str, Any]], None]) -> None:
        self.engine, self.monitor, self.coordinator, self.emit = engine, monitor, coordinator, emit
        self.last_estimate: dict[str, float] = {}

    def stable_ranks(self, step: int, names: list[str]) -> dict[str, float]:
        """Collective: the stable rank of every layer in `names` from the shards, rank 0's values on every rank."""
        start = time.perf_counter()
        results = self.monitor.estimate(self.engine.shard_views(names))
        values = self.coordinator.broadcast_values({n: r.value for n, r in results.items()})
        self.last_estimate = values
        self.emit({"event": "estimate", "step": step, "sranks": values, "seconds": time.perf_counter() - start,
                   "monitor_bytes": self.monitor.stats.bytes, "monitor_collectives": self.monitor.stats.collectives})
        return values


class Method(ABC):
    """One low-rank method over the layers it targets. Subclasses set `name` (the `lowrank.strategy` value)."""

    name: ClassVar[str]
    finished: bool = False  # built for a resumed run that is past its last change: no targets, nothing to decide

    def __init__(self, cfg: "LowRankConfig", targets: dict[str, nn.Module], dims: dict[str, tuple[int, int]]) -> None:
        self.cfg, self.targets, self.dims = cfg, dict(targets), dict(dims)
        self.names = list(targets)             # the layers the method was built over (targets shrink as they change)
        self.ranks: dict[str, int] = {}        # layer -> its current (active) rank, once it has one
        self.capacities: dict[str, int] = {}   # layer -> allocated rank, for methods that allocate more than they use

    # -- before an engine exists ---------------------------------------------------------------------
    @classmethod
    def prepare_model(cls, model: nn.Module, cfg: "LowRankConfig") -> nn.Module:
        """The model as this method trains it, before an engine wraps it (default: unchanged)."""
        return model

    @classmethod
    def layer_for_layout(cls, module: nn.Module, entry: dict) -> Optional[nn.Module]:
        """An empty layer of this method's checkpoint layout entry `entry` in place of the dense `module` (a run
        that switched to the method's layers mid-run, resumed into a freshly built dense model); default: None."""
        return None

    @classmethod
    def check_run(cls, cfg: "LowRankConfig", sharded_parameters: bool) -> None:
        """Raise a one-line ConfigError for an option this method cannot run on such an engine."""

    @classmethod
    def select(cls, cfg: "LowRankConfig", model: nn.Module, engine: Any) -> tuple[dict[str, nn.Module], dict]:
        """The layers this method watches and their (m, n); default: the configured dense targets."""
        from dist_lowrank.targeting import select_targets

        modules = select_targets(model, cfg.target_modules, cfg.exclude_modules)
        return modules, {v.name: tuple(v.dims) for v in engine.shard_views(list(modules))}

    # -- every step ------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def done(self) -> bool:
        """True once the method changes no rank any more."""

    def start(self, probe: Probe) -> None:
        """Once, before the first training step (Cuttlefish: the init measurement)."""

    def update(self, step: int, probe: Probe) -> None:
        """Collective, after every finite optimizer step: the method's own move of the weights (DLRT's integrator:
        new bases and a truncated core, written through `probe.engine.write`); default: none."""

    @abstractmethod
    def due(self, step: int) -> bool:
        """Whether `measure` and `decide` run after this optimizer step."""

    @abstractmethod
    def measure(self, step: int, probe: Probe) -> Any:
        """Collective: what the decision needs (stable ranks, spectra, ...), identical on every rank."""

    @abstractmethod
    def decide(self, step: int, measurement: Any) -> Optional[Plan]:
        """Pure: the plan this measurement calls for, or None."""

    @abstractmethod
    def shape_change(self, plan: Plan, model: nn.Module) -> Optional["ShapeChange"]:
        """The agreed plan for the engines; changes that need no reshard (e.g. a rank growing inside its capacity)
        are made here, in place. None or an empty change: nothing to reshard."""

    def committed(self, plan: Plan, measurements: dict[str, Any]) -> dict[str, Any]:
        """After the engines carried out the plan: update ranks/targets; returns the fields the event logs."""
        self.ranks.update(plan.ranks)
        return {"ranks": dict(plan.ranks), "measurements": measurements}

    # -- around backward ---------------------------------------------------------------------------------
    def loss_term(self, model: nn.Module) -> Optional[torch.Tensor]:
        """A term the method's layers computed in the last forward (where every engine holds whole parameters),
        added to the loss on every engine; default: none."""
        return None

    def regularize(self, loss: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """The loss with the method's penalty (engines that own the gradients); default: unchanged."""
        return loss

    def after_backward(self, model: nn.Module) -> None:
        """The method's gradient terms, where gradients are plain `.grad` tensors; default: none."""

    # -- checkpoints -------------------------------------------------------------------------------------
    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: a resumed method makes the same decisions."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...
