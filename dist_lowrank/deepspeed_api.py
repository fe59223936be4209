"""The one call a DeepSpeed user changes: `dist_lowrank.deepspeed_api.initialize` for `deepspeed.initialize`.

    engine, optimizer, _, scheduler = dist_lowrank.deepspeed_api.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-4), config="ds_config.json")
    for batch in data:
        loss = engine(batch)            # unchanged
        engine.backward(loss)           # unchanged
        engine.step()                   # unchanged; the switch happens in here when it is due
        engine.save_checkpoint(dir)     # unchanged

The ds_config carries a `"lowrank"` section (validated strictly; DeepSpeed itself ignores it). The
returned engine is a thin proxy: when the plan changes layer shapes the DeepSpeed engine underneath
is rebuilt, and the proxy forwards every call to the current one. Hold on to the proxy, not to
`engine.module` or `engine.optimizer` across a switch.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from dist_lowrank.backends.param_groups import is_scheduler_instance
from dist_lowrank.config import LowRankConfig, from_ds_config


def _optimizer_factory(optimizer: Any) -> Any:
    """The client optimizer as the backend takes it: a torch optimizer instance (the first engine uses it
    with its param groups; rebuilds re-create its class with the same groups by name, see
    backends/param_groups.py), a callable params -> optimizer, or None (the ds_config's optimizer)."""
    if optimizer is None or isinstance(optimizer, torch.optim.Optimizer) or callable(optimizer):
        return optimizer
    raise TypeError("optimizer: expected a torch.optim.Optimizer, a callable params -> optimizer, or None")


def _scheduler_spec(lr_scheduler: Any) -> Any:
    """An LR scheduler instance (kept from the first step and re-bound at each rebuild) or a callable
    optimizer -> scheduler (called once, for the first engine); anything else is refused by name."""
    if lr_scheduler is None or callable(lr_scheduler) or is_scheduler_instance(lr_scheduler):
        return lr_scheduler
    raise TypeError(f"lr_scheduler: expected an LR scheduler instance or a callable optimizer -> scheduler, got "
                    f"{type(lr_scheduler).__name__}")


def step_loss(micro_losses: list[float], overflow: bool) -> float:
    """A DeepSpeed optimizer step's loss as the controller takes it: the mean over its micro-batches, NaN when the
    engine skipped the step (fp16 overflow), saw no micro-batch, or the mean is not finite."""
    loss = float("nan") if overflow or not micro_losses else sum(micro_losses) / len(micro_losses)
    return loss if math.isfinite(loss) else float("nan")


class LowRankDeepSpeedEngine:
    """Forwards to the current DeepSpeed engine and runs the controller at each optimizer step."""

    def __init__(self, backend: Any, controller: Any, telemetry: Any = None) -> None:
        self._backend = backend
        self._controller = controller
        self._telemetry = telemetry  # lowrank.logging without a strategy: the proxy feeds it itself
        self._micro_losses: list[float] = []  # since the last optimizer step (gradient accumulation)

    @property
    def engine(self):
        """The DeepSpeed engine currently underneath (changes at a switch)."""
        return self._backend.engine

    @property
    def controller(self):
        return self._controller

    def __call__(self, *args, **kwargs):
        context = self._controller.record_shapes() if self._controller else None
        if context is None:
            return self.engine(*args, **kwargs)
        with context:
            return self.engine(*args, **kwargs)

    forward = __call__

    def backward(self, loss: torch.Tensor, *args, **kwargs):
        self._micro_losses.append(float(loss.detach().float()))
        if self._controller is not None:  # the method's terms (a rank prior, Frobenius decay) join the user's loss
            loss = self._controller.regularize(loss)
        self._backend.note_backward()
        return self.engine.backward(loss, *args, **kwargs)

    def step(self, *args, **kwargs):
        engine = self.engine
        boundary = engine.is_gradient_accumulation_boundary()
        skipped_before = getattr(engine, "skipped_steps", 0)
        result = engine.step(*args, **kwargs)
        micro = self._micro_losses  # the step's loss: the mean over its micro-batches
        if boundary:
            self._micro_losses = []
            self._backend.link_optimizer_state_once()
        if boundary and (self._controller is not None or self._telemetry is not None):
            loss = step_loss(micro, overflow=getattr(engine, "skipped_steps", 0) != skipped_before)
            if self._controller is not None:  # with lowrank.logging it also records the step's telemetry
                self._controller.after_step(int(engine.global_steps), loss)
            else:
                self._telemetry.end_step(int(engine.global_steps), loss)
                self._telemetry.after_controller(int(engine.global_steps), None)
        return result

    def close(self) -> Optional[dict]:
        """lowrank.logging (all ranks together): log the last partial window, write the summary and the report
        (optional: at exit otherwise, without the partial window). Returns the summary."""
        return self._telemetry.close() if self._telemetry is not None else None

    def __getattr__(self, name: str):
        return getattr(self._backend.engine, name)


def initialize(model: nn.Module, optimizer: Any = None, config: Union[str, dict, None] = None,
               lr_scheduler: Any = None, model_fn: Optional[Callable[[], nn.Module]] = None,
               steps_per_epoch: Optional[int] = None, **kwargs: Any):
    """Drop-in for `deepspeed.initialize`: same return tuple (engine, optimizer, dataloader, scheduler).

    `optimizer` may be a torch optimizer instance (used as is for the first engine; at a rebuild re-created
    with its class and defaults and the same param groups by name, state transplanted) or a callable
    `params -> optimizer`. `lr_scheduler` may be an instance driving that optimizer (kept from the first
    step and re-bound to each rebuilt optimizer at its position) or a callable `optimizer -> scheduler`.
    """
    from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend
    from dist_lowrank.api import start_controller
    from dist_lowrank.telemetry.comm import CommCounter
    from dist_lowrank.telemetry.library import library_telemetry, wanted as telemetry_wanted

    if isinstance(config, str):
        with open(config) as fh:
            config = json.load(fh)
    config = dict(config or {})
    lowrank: LowRankConfig = from_ds_config(config)
    ds_config = {k: v for k, v in config.items() if k != "lowrank"}
    counter = CommCounter().install() if telemetry_wanted(lowrank) else None  # before DeepSpeed's comm backend
    backend = DeepSpeedBackend(model, ds_config, _optimizer_factory(optimizer),
                               scheduler_factory=_scheduler_spec(lr_scheduler), model_fn=model_fn, **kwargs)
    telemetry = library_telemetry(backend, lowrank, "deepspeed_api.initialize", counter=counter,
                                  samples_per_step=int(backend.engine.train_batch_size()))
    controller = start_controller(backend, lowrank, steps_per_epoch, telemetry)
    engine = LowRankDeepSpeedEngine(backend, controller, telemetry)
    return engine, engine.engine.optimizer, getattr(backend, "dataloader", None), engine.engine.lr_scheduler
