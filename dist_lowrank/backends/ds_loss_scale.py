"""DeepSpeed's loss-scale state, carried across an engine rebuild.

A switch or a growth builds a new DeepSpeed engine; its optimizer makes a fresh loss scaler
(deepspeed/runtime/fp16/loss_scaler.py: `CreateLossScaler`), so without this the fp16 dynamic scale
would restart at `initial_scale_power` with full hysteresis and a new overflow window — a burst of
skipped steps right after every switch. What lives where (DeepSpeed 0.19.8):
- ZeRO-1/2/3 and ZeRO-0 fp16 optimizers hold `loss_scaler` (DynamicLossScaler: `cur_scale`, `cur_iter`,
  `last_overflow_iter`, `cur_hysteresis`; a static LossScaler: `cur_scale`) and `custom_loss_scaler` /
  `external_loss_scale` (a scale the user set by hand);
- the engine holds `skipped_steps` (carried with the other step counters by the backend) and, for ZeRO-0
  with fp16 torch_autocast, a `torch.amp.GradScaler` (`torch_autocast_z0_gradscaler`: its state_dict).
The scaler's configuration (scale_window, min_scale, delayed_shift, ...) comes from the same ds_config
in the new engine; only the running state is carried.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from dist_lowrank.errors import DistLowRankError

SCALER_STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
OPTIMIZER_STATE = ("custom_loss_scaler", "external_loss_scale")
GRAD_SCALER = "torch_autocast_z0_gradscaler"


@dataclass
class LossScaleState:
    """The running loss-scale state of one engine (empty where the engine has none, e.g. bf16 on ZeRO-0)."""

    scaler_type: Optional[str] = None
    scaler: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    grad_scaler: Optional[dict[str, Any]] = None


def capture(engine: Any) -> LossScaleState:
    """Read the loss-scale state of `engine` (call before the engine is destroyed)."""
    optimizer = getattr(engine, "optimizer", None)
    scaler = getattr(optimizer, "loss_scaler", None)
    state = LossScaleState()
    if scaler is not None:
        state.scaler_type = type(scaler).__name__
        state.scaler = {k: getattr(scaler, k) for k in SCALER_STATE if hasattr(scaler, k)}
    state.optimizer = {k: getattr(optimizer, k) for k in OPTIMIZER_STATE if hasattr(optimizer, k)}
    grad_scaler = getattr(engine, GRAD_SCALER, None)
    if grad_scaler is not None:
        state.grad_scaler = grad_scaler.state_dict()
    return state


def restore(engine: Any, state: LossScaleState) -> None:
    """Write `state` into a rebuilt engine built from the same ds_config. A scaler of another kind (the
    config changed the precision between the two engines) is refused by name."""
    optimizer = getattr(engine, "optimizer", None)
    scaler = getattr(optimizer, "loss_scaler", None)
    if state.scaler_type is not None:
        if scaler is None or type(scaler).__name__ != state.scaler_type:
            found = type(scaler).__name__ if scaler is not None else "none"
            raise DistLowRankError(f"loss scale: the rebuilt engine's optimizer has a {found} loss scaler, the "
                                   f"engine before the rebuild a {state.scaler_type}; its state cannot carry over")
        for key, value in state.scaler.items():
            setattr(scaler, key, value)
    for key, value in state.optimizer.items():
        if hasattr(optimizer, key):
            setattr(optimizer, key, value)
    grad_scaler = getattr(engine, GRAD_SCALER, None)
    if state.grad_scaler is not None and grad_scaler is not None:
        grad_scaler.load_state_dict(state.grad_scaler)


def current_scale(engine: Any) -> float:
    """The loss scale the engine's next backward applies (fp16: the scaler's cur_scale; bf16/fp32: 1)."""
    if not (callable(getattr(engine, "fp16_enabled", None)) and engine.fp16_enabled()):
        return 1.0
    optimizer = getattr(engine, "optimizer", None)
    scaler = getattr(optimizer, "loss_scaler", None)
    value = getattr(scaler, "cur_scale", None) if scaler is not None else getattr(optimizer, "cur_scale", None)
    return float(value) if value is not None else 1.0
