"""DistributedDataParallel: weights are replicated, so a reshard is surgery on every rank + a new DDP.

DDP's reducer holds hooks on the old parameters; the old wrapper is dropped before the new one is
built over the new parameters (the only supported way to change a DDP model's parameters).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_lowrank.backends.local_backend import LocalBackend, OptimizerFactory, SchedulerFactory
from dist_lowrank.device import default_device


class DDPBackend(LocalBackend):
    """DDP over the user's module; the module stays at `self.module`, the wrapper at `self.model`."""

    name = "ddp"

    def __init__(self, model: nn.Module, optimizer_factory: OptimizerFactory,
                 scheduler_factory: Optional[SchedulerFactory] = None, ddp_kwargs: Optional[dict[str, Any]] = None,
                 comm_hook: Optional[Callable] = None, param_groups: Optional[list[dict[str, Any]]] = None):
        """optimizer_factory / scheduler_factory: a factory or an instance (see LocalBackend)."""
        self.ddp_kwargs = dict(ddp_kwargs or {})
        self.comm_hook = comm_hook  # e.g. telemetry.comm.CommCounter.ddp_hook(); re-registered after rebuilds
        super().__init__(model.to(default_device()), optimizer_factory, scheduler_factory, param_groups)

    def wrap(self, module: nn.Module) -> nn.Module:
        device = default_device()
        kwargs = dict(self.ddp_kwargs)
        if device.type == "cuda":
            kwargs.setdefault("device_ids", [device.index])
        wrapped = DistributedDataParallel(module, **kwargs)
        if self.comm_hook is not None:
            wrapped.register_comm_hook(None, self.comm_hook)
        return wrapped
