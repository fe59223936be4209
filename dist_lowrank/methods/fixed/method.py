"""The fixed-ratio baseline as a Method: the shared one-switch machinery with FixedRatioStrategy's rule."""
from __future__ import annotations

from dist_lowrank.methods.fixed.rule import FixedRatioStrategy
from dist_lowrank.methods.switching import SwitchMethod


class FixedMethod(SwitchMethod):
    name = "fixed"

    @classmethod
    def make_rule(cls, cfg, dims):
        return FixedRatioStrategy(cfg.fixed, dims, cfg.min_rank)
