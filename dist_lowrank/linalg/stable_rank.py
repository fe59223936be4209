"""Stable rank srank(W) = ‖W‖_F² / σ_max², computed in fp64 whatever the weight dtype.

Results are named instead of raised: a zero matrix has srank 0 ("zero"), a matrix with NaN/Inf gets
NaN ("nonfinite") — checked before any LAPACK call, so a bad weight never crashes a rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dist_lowrank.linalg.krylov import sigma_max_batched


@dataclass(frozen=True)
class SrankResult:
    """value = fro_sq / sigma_max²; status: "ok", "zero" (value 0.0) or "nonfinite" (value NaN)."""

    value: float
    fro_sq: float
    sigma_max: float
    status: str


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """fp64 2-D copy: conv (c_out, c_in, kh, kw) → (c_out, c_in·kh·kw); a vector → (1, n)."""
    w = weight.detach()
    if w.dim() == 0:
        w = w.reshape(1, 1)
    elif w.dim() == 1:
        w = w.reshape(1, -1)
    elif w.dim() > 2:
        w = w.reshape(w.shape[0], -1)
    return w.to(torch.float64)


def stable_rank(weight: torch.Tensor, method: str = "exact", steps: int = 20) -> SrankResult:
    """Stable rank of one weight; `method` is "exact" (SVD), "lanczos" or "power" (`steps` iterations)."""
    w = as_matrix(weight)
    if not bool(torch.isfinite(w).all()):
        return SrankResult(math.nan, math.nan, math.nan, "nonfinite")
    fro_sq = float(w.square().sum())
    if fro_sq == 0.0:
        return SrankResult(0.0, 0.0, 0.0, "zero")
    if method == "exact":
        sigma = float(torch.linalg.svdvals(w)[0])
    elif method in ("lanczos", "power"):
        sigma = sigma_max_batched(lambda vs: [w @ vs[0]], lambda us: [w.T @ us[0]], [tuple(w.shape)],
                                  method=method, steps=steps)[0]
    else:
        raise ValueError(f"method: got {method!r}; allowed: exact, lanczos, power")
    return SrankResult(fro_sq / (sigma * sigma), fro_sq, sigma, "ok")
