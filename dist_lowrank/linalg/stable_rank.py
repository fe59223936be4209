"""Stable rank srank(W) = ‖W‖_F² / σ_max², computed in fp64 whatever the weight dtype.

Results are named instead of raised: a zero matrix has srank 0 ("zero"), a matrix with NaN/Inf gets
NaN ("nonfinite") — checked before any LAPACK call, so a bad weight never crashes a rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dist_lowrank.linalg.krylov import sigma_max_gram

METHODS = ("exact", "lanczos", "power")


@dataclass(frozen=True)
class SrankResult:
    """value = fro_sq / sigma_max²; status: "ok", "zero" (value 0.0) or "nonfinite" (value NaN)."""

    value: float
    fro_sq: float
    sigma_max: float
    status: str


NONFINITE = SrankResult(math.nan, math.nan, math.nan, "nonfinite")
ZERO = SrankResult(0.0, 0.0, 0.0, "zero")


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Detached fp64 2-D view/copy: conv (c_out, c_in, kh, kw) → (c_out, c_in·kh·kw); a vector → (1, n).

    fp64 because LAPACK has no half-precision SVD and srank of near-flat spectra needs the digits.
    """
    w = weight.detach()
    if w.dim() == 0:
        w = w.reshape(1, 1)
    elif w.dim() == 1:
        w = w.reshape(1, -1)
    elif w.dim() > 2:
        w = w.reshape(w.shape[0], -1)
    return w.to(torch.float64)


def stable_rank(weight: torch.Tensor, method: str = "exact", steps: int = 20, rtol: float = 0.0,
                seed: int = 0) -> SrankResult:
    """Stable rank of one weight; `method` is "exact" (SVD), "lanczos" or "power" (at most `steps`
    iterations, fewer once σ_max moves less than `rtol` relative per step; 0 = always `steps`; Krylov start vector
    from `seed`).

    The matrix is scaled by its largest |entry| first: srank is scale-invariant, and this keeps
    ‖W‖_F² from overflowing or underflowing (fro_sq and sigma_max are reported unscaled).
    """
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}; allowed: {', '.join(METHODS)}")
    w = as_matrix(weight)
    if not bool(torch.isfinite(w).all()):
        return NONFINITE
    peak = float(w.abs().max()) if w.numel() else 0.0
    if peak == 0.0:
        return ZERO
    x = w / peak
    fro_unit = float(x.square().sum())
    if method == "exact":
        sigma_unit = float(torch.linalg.svdvals(x)[0])
    else:
        # Lanczos on the smaller Gram matrix (xᵀx or x xᵀ): same σ_max, one orthogonalization per step.
        g = x if x.shape[1] <= x.shape[0] else x.T
        sigma_unit = sigma_max_gram(lambda vs: [g.T @ (g @ vs[0])], [g.shape[1]], method=method, steps=steps,
                                    device=x.device, rtol=rtol, seed=seed)[0]
    value = fro_unit / (sigma_unit * sigma_unit) if sigma_unit > 0.0 else math.inf
    return SrankResult(value, fro_unit * peak * peak, sigma_unit * peak, "ok")
