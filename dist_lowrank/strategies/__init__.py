"""When and what to change: pure decision logic (never imports a backend)."""
from dist_lowrank.strategies.base import Strategy
from dist_lowrank.strategies.cuttlefish import CuttlefishStrategy, ema, scale_factor, stability_score
from dist_lowrank.strategies.factory import build_strategy
from dist_lowrank.strategies.fixed import FixedRatioStrategy
from dist_lowrank.strategies.inrank import InRankGrowthRule, InRankStrategy, next_capacity

__all__ = ["Strategy", "CuttlefishStrategy", "FixedRatioStrategy", "InRankGrowthRule", "InRankStrategy",
           "build_strategy", "ema", "scale_factor", "stability_score", "next_capacity"]
