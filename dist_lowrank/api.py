"""The small public surface for FSDP2 / DDP users: attach a controller to a backend."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from dist_lowrank.backends.base import Backend
from dist_lowrank.config import LowRankConfig, load_config
from dist_lowrank.controller import LowRankController

if TYPE_CHECKING:
    from dist_lowrank.telemetry.session import RunTelemetry


def attach(backend: Backend, config: Union[LowRankConfig, dict, str, Path],
           steps_per_epoch: Optional[int] = None) -> LowRankController:
    """Validate the `lowrank` config, build the controller, take the init measurement (collective).

    With a `lowrank.logging` section, `controller.after_step(step, loss)` also writes the CLI's telemetry
    (events.jsonl, TensorBoard, report at `controller.close()` or at exit); call attach before the first
    backward (DDP's gradient all-reduces are counted through a comm hook registered here)."""
    from dist_lowrank.telemetry.library import library_telemetry

    cfg = config if isinstance(config, LowRankConfig) else load_config(config)
    telemetry = library_telemetry(backend, cfg, source="attach")
    return start_controller(backend, cfg, steps_per_epoch, telemetry)


def start_controller(backend: Backend, cfg: LowRankConfig, steps_per_epoch: Optional[int],
                     telemetry: Optional["RunTelemetry"],
                     resume_state: Optional[dict] = None) -> Optional[LowRankController]:
    """The controller with its init measurement, or with a checkpoint's `resume_state` instead (None for
    `strategy: none`); the telemetry counts training traffic from here on, and a failure while starting closes it
    so the log says where the run ended."""
    controller = None
    try:
        if cfg.strategy != "none":
            controller = LowRankController(backend, cfg, steps_per_epoch=steps_per_epoch, telemetry=telemetry,
                                           resume_state=resume_state)
            if resume_state is None:
                controller.start()
    except BaseException:
        if telemetry is not None:
            telemetry.close(flush=False, report=False)
        raise
    if telemetry is not None:
        telemetry.ready()  # engine set-up and the init estimate are not training traffic
    return controller
