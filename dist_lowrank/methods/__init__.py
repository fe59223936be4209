"""Low-rank methods, one folder each (cuttlefish, inrank, fixed, ...): config section, layers, what is measured,
the decision rule and its state. The controller and the training loop reach them only through this package."""
from __future__ import annotations

from torch import nn

from dist_lowrank.config import LowRankConfig
from dist_lowrank.errors import ConfigError


def prepare_model(model: nn.Module, cfg: LowRankConfig) -> nn.Module:
    """The model as the configured method trains it, before any engine wraps it (InRank: W0 + U Vᵀ layers)."""
    if cfg.strategy == "inrank":
        from dist_lowrank.inrank_model import to_inrank

        return to_inrank(model, cfg)
    return model


def check_run(cfg: LowRankConfig, sharded_parameters: bool) -> None:
    """Refuse, in one line, a method option the engine cannot run (sharded_parameters: FSDP2, ZeRO-3)."""
    if cfg.cuttlefish.frobenius_decay > 0 and sharded_parameters:
        raise ConfigError("lowrank.cuttlefish.frobenius_decay: not supported with sharded parameters (fsdp2, "
                          "ZeRO-3) yet; allowed there: 0")
