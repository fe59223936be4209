"""The `lowrank.inrank` section: how InRank grows factor ranks and allocates capacity."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from dist_lowrank.config_io import Range, ge, gt
from dist_lowrank.config_io import help_field as _help


@dataclass
class InRankConfig:
    """InRank: grow factor ranks while the explained ratio of the update says more rank is needed."""

    init_rank: int = _help("starting rank of every factorized layer (>= 1)", check=ge(1), default=8)
    warmup: int = _help("optimizer steps before the first growth check", check=ge(0), default=50)
    gap: int = _help("optimizer steps between growth checks (>= 1)", check=ge(1), default=50)
    tau: float = _help("explained-ratio threshold g(k) > tau, in (0, 1)", check=Range(0, 1, lo_open=True, hi_open=True), default=0.9)
    buffer: int = _help("search ranks in [r, r + buffer) (>= 1)", check=ge(1), default=8)
    growth_factor: float = _help("capacity grows geometrically by this factor (> 1)", check=gt(1), default=1.5)
    capacity_multiple: int = _help("capacities are rounded up to a multiple of this (>= 1)", check=ge(1), default=8)
    w0_mode: Literal["frozen", "trained", "none"] = _help(
        "W = W0 + U V with W0 frozen or trained; 'none' = W = U V only (the released reference)", default="frozen"
    )
    fix_after: Optional[int] = _help("efficient InRank: fix ranks at this step (null = keep growing)", check=ge(0), default=None)
    fold_on_fix: bool = _help("on fix, fold W0 + U V into a pure factorization by truncated SVD", default=False)
