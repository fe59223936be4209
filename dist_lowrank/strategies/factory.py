"""The strategy named in the config."""
from __future__ import annotations

from typing import Optional

from dist_lowrank.config import LowRankConfig
from dist_lowrank.errors import ConfigError
from dist_lowrank.strategies.base import Strategy
from dist_lowrank.strategies.cuttlefish import CuttlefishStrategy
from dist_lowrank.strategies.fixed import FixedRatioStrategy
from dist_lowrank.strategies.inrank import InRankGrowthRule


def build_strategy(cfg: LowRankConfig, dims: dict[str, tuple[int, int]]) -> Optional[Strategy]:
    """The configured strategy over the target layers `dims` (name -> (m, n)); None for "none"."""
    if cfg.strategy == "none":
        return None
    if cfg.strategy == "cuttlefish":
        return CuttlefishStrategy(cfg.cuttlefish, dims, cfg.min_rank)
    if cfg.strategy == "fixed":
        return FixedRatioStrategy(cfg.fixed, dims, cfg.min_rank)
    if cfg.strategy == "inrank":
        return InRankGrowthRule(cfg.inrank, dims)
    raise ConfigError(f"lowrank.strategy: got {cfg.strategy!r}; allowed: cuttlefish, inrank, fixed, none")
