"""When and what to change: pure decision logic (never imports a backend)."""
from dist_lowrank.strategies.base import Strategy
from dist_lowrank.strategies.cuttlefish import CuttlefishStrategy, ema, stability_score
from dist_lowrank.strategies.factory import build_strategy
from dist_lowrank.strategies.fixed import FixedRatioStrategy
from dist_lowrank.strategies.inrank import InRankGrowthRule, next_capacity

__all__ = ["Strategy", "CuttlefishStrategy", "FixedRatioStrategy", "InRankGrowthRule", "build_strategy", "ema",
           "stability_score", "next_capacity"]
