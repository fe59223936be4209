"""Telemetry for the library API: `lowrank.logging` turns it on for `attach()` and `deepspeed_api.initialize()`.

The user's loop makes no new call: the DeepSpeed proxy's `step()` and the controller's `after_step()` feed
the same RunTelemetry as `dist-lowrank train`; `close()` on either (optional) logs the last partial window,
else the summary and report are written when the interpreter exits.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from dist_lowrank.config import LowRankConfig, config_to_dict
from dist_lowrank.telemetry.comm import CommCounter
from dist_lowrank.telemetry.session import RunTelemetry, comm_model_of

log = logging.getLogger("dist_lowrank")


def wanted(cfg: LowRankConfig) -> bool:
    """True when the `lowrank.logging` section asks for a run log or TensorBoard."""
    return bool(cfg.logging.out_dir or cfg.logging.tensorboard_dir)


def count_ddp_buckets(backend: Any, counter: CommCounter) -> None:
    """DDP's bucket all-reduces bypass torch.distributed's Python functions: count them with the counter's
    comm hook, registered now (before the first backward, as DDP requires) and after every rebuild."""
    if not hasattr(backend, "comm_hook"):
        return
    if backend.comm_hook is not None:
        log.warning("lowrank.logging: the DDP model has its own comm hook; its gradient all-reduces are not counted")
        return
    backend.comm_hook = counter.ddp_hook()
    backend.model.register_comm_hook(None, backend.comm_hook)


def library_telemetry(backend: Any, cfg: LowRankConfig, source: str, counter: Optional[CommCounter] = None,
                      samples_per_step: Optional[int] = None) -> Optional[RunTelemetry]:
    """The run's telemetry for a library user (None when `lowrank.logging` asks for none). `counter`: one
    installed before the engine was built (DeepSpeed keeps references to torch.distributed functions);
    `samples_per_step`: the engine's global batch when `lowrank.logging.samples_per_step` is not set."""
    if not wanted(cfg):
        return None
    counter = counter or CommCounter().install()
    count_ddp_buckets(backend, counter)
    settings = cfg.logging
    telemetry = RunTelemetry(settings.out_dir, settings.log_every, comm_model_of(backend),
                             samples_per_step=settings.samples_per_step or samples_per_step,
                             tokens_per_sample=settings.tokens_per_sample, tensorboard_dir=settings.tensorboard_dir,
                             counter=counter)
    telemetry.owns_counter = True
    telemetry.summary_extra = {"task": None, "strategy": cfg.strategy}
    telemetry.begin(backend.unwrapped_model, {"source": source, "lowrank": config_to_dict(cfg)})
    telemetry.close_at_exit()
    return telemetry
