"""Low-rank methods, one folder each: `methods/<name>/` holds the method's config section (config.py), its layers,
what it measures, its decision rule (rule.py) and the `Method` the controller drives (method.py).

This package is the only place that knows which methods exist (`METHODS`); the controller, the training loop and the
checkpoint code reach a method through the registry and the `methods.base.Method` protocol. Kept import-light: the
config schema imports the methods' config sections from here.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

if TYPE_CHECKING:
    from dist_lowrank.config import LowRankConfig
    from dist_lowrank.methods.base import Method

# lowrank.strategy value -> "module:class" of its Method (imported on first use)
METHODS = {
    "cuttlefish": "dist_lowrank.methods.cuttlefish.method:CuttlefishMethod",
    "fixed": "dist_lowrank.methods.fixed.method:FixedMethod",
    "inrank": "dist_lowrank.methods.inrank.method:InRankMethod",
    "dlrt": "dist_lowrank.methods.dlrt.method:DLRTMethod",
    "tensor": "dist_lowrank.methods.tensor.method:TensorMethod",
}


def method_class(name: str) -> Optional[type["Method"]]:
    """The Method class of a `lowrank.strategy` value; None for "none" (full rank)."""
    if name == "none":
        return None
    if name not in METHODS:
        from dist_lowrank.errors import ConfigError

        raise ConfigError(f"lowrank.strategy: got {name!r}; allowed: {', '.join(sorted(METHODS))}, none")
    module, cls = METHODS[name].split(":")
    return getattr(import_module(module), cls)


def build_method(cfg: "LowRankConfig", engine: Any, steps_per_epoch: Optional[int] = None,
                 finished: bool = False) -> Optional["Method"]:
    """The configured method over the engine's model; `finished` (a resumed run past its last change): no targets."""
    cls = method_class(cfg.strategy)
    if cls is None:
        return None
    return cls.create(cfg, engine, steps_per_epoch=steps_per_epoch, finished=finished)


def prepare_model(model: nn.Module, cfg: "LowRankConfig") -> nn.Module:
    """The model as the configured method trains it, before any engine wraps it (InRank: W0 + U Vᵀ layers)."""
    cls = method_class(cfg.strategy)
    return model if cls is None else cls.prepare_model(model, cfg)


def check_run(cfg: "LowRankConfig", sharded_parameters: bool) -> None:
    """Refuse, in one line, a method option the engine cannot run (sharded_parameters: FSDP2, ZeRO-3)."""
    cls = method_class(cfg.strategy)
    if cls is not None:
        cls.check_run(cfg, sharded_parameters)


def layer_for_layout(module: nn.Module, entry: dict) -> Optional[nn.Module]:
    """The method layer a checkpoint's layout entry describes, built in place of the dense `module` by the method
    whose layers carry `entry["type"]`; None if no method builds it (checkpoint.manifest.apply_layout)."""
    for name in METHODS:
        layer = method_class(name).layer_for_layout(module, entry)
        if layer is not None:
            return layer
    return None
