"""The `lowrank.dlrt` section: the integrator, its truncation tolerance, rank bounds and the physical capacity."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from dist_lowrank.config_io import Range, ge, gt
from dist_lowrank.config_io import help_field as _help


@dataclass
class DLRTConfig:
    """DLRT: W = U S Vᵀ; every step K = U S, L = V Sᵀ and S take the optimizer's step, the bases are augmented to
    2r columns and the 2r×2r core is truncated at the tolerance theta."""

    theta: float = _help("truncation tolerance: keep the smallest rank j with ||sigma[j:]|| < theta·||sigma|| "
                         "(relative) or < theta (absolute)", check=gt(0), default=0.1)
    absolute: bool = _help("theta is an absolute tolerance on ||sigma[j:]|| instead of relative to ||sigma||",
                           default=False)
    integrator: Literal["parallel", "kls"] = _help(
        "parallel: one forward+backward, core [[S1, L1ᵀṼ], [ŨᵀK1, 0]]; kls: the K, L, S integrator (the S step on "
        "the augmented bases, its extra block from the same batch's activations)", default="parallel")
    init_rank: int = _help("rank of every DLRT layer at the start (>= 1)", check=ge(1), default=16)
    min_rank: int = _help("ranks never go below this (>= 1)", check=ge(1), default=2)
    max_rank: Optional[int] = _help("ranks never go above this (null: min(m, n) / 2, as the reference)",
                                    check=ge(1), default=None)
    start: Literal["scratch", "switch"] = _help(
        "scratch: U S V from the SVD of the layer's initial weight at init_rank (Haar-random bases, the dense "
        "spectrum); switch: train dense first (Cuttlefish's detector, the lowrank.cuttlefish section, picks the "
        "step and the first ranks), then U S V from the trained weight's truncated SVD",
        default="scratch")
    integrate_every: int = _help("run the integrator (basis augmentation, truncation, rank decision) every this many "
                                 "optimizer steps; in between K, L and S take plain optimizer steps on fixed bases "
                                 "(parallel integrator only; >= 1)", check=ge(1), default=1)
    adaptive_steps: Optional[int] = _help("optimizer steps of rank adaptation; after them U and V are fixed and "
                                          "only S trains (the paper's fine-tuning phase); null: adapt to the end",
                                          check=ge(1), default=None)
    moments: Literal["rotate", "reset"] = _help(
        "optimizer moments of K, L, S across a basis change: rotated into the new bases, or reset to zero",
        default="rotate")
    growth_factor: float = _help("capacity grows geometrically by this factor when a rank outgrows it (> 1)",
                                 check=gt(1), default=1.5)
    capacity_multiple: int = _help("capacities are rounded up to a multiple of this (>= 1)", check=ge(1), default=8)
    shrink_below: float = _help("shrink the capacity when the rank stays below this fraction of it, in (0, 1)",
                                check=Range(0, 1, lo_open=True, hi_open=True), default=0.5)
    shrink_patience: int = _help("optimizer steps the rank must stay below shrink_below·capacity before the "
                                 "capacity shrinks (hysteresis, >= 1)", check=ge(1), default=20)
