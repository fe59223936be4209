"""The small public surface for FSDP2 / DDP users: attach a controller to a backend."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from dist_lowrank.backends.base import Backend
from dist_lowrank.config import LowRankConfig, load_config
from dist_lowrank.controller import LowRankController


def attach(backend: Backend, config: Union[LowRankConfig, dict, str, Path],
           steps_per_epoch: Optional[int] = None) -> LowRankController:
    """Validate the `lowrank` config, build the controller, take the init measurement (collective)."""
    cfg = config if isinstance(config, LowRankConfig) else load_config(config)
    controller = LowRankController(backend, cfg, steps_per_epoch=steps_per_epoch)
    controller.start()
    return controller
