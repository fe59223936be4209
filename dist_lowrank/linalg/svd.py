"""Truncated SVD split W ≈ (U√Σ)(√ΣVᵀ) — the spectral initialization of a factor pair."""
from __future__ import annotations

import torch


def truncated_svd_factors(weight: torch.Tensor, rank: int,
                          compute_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A (m×r) = U√Σ, B (r×n) = √ΣVᵀ of a 2-D weight, returned in the weight's dtype and device.

    The SVD runs in `compute_dtype` (fp64 by default: stable for nearly equal singular values and
    exact to round-off; a caller may pass fp32 for speed on large layers, ~2× on CPU). `rank` is
    clipped to min(m, n). Signs are fixed (largest-|.| entry of each column of U positive) so every
    process gets the same factors from the same weight.
    """
    if weight.dim() != 2:
        raise ValueError(f"truncated_svd_factors: expected a 2-D matrix, got shape {tuple(weight.shape)}")
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise ValueError(f"rank: got {rank!r}; allowed: an int >= 1")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("truncated_svd_factors: the weight has NaN/Inf entries")
    w = weight.detach().to(compute_dtype)
    r = min(int(rank), min(w.shape))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivot, torch.arange(r, device=u.device)])
    signs[signs == 0] = 1.0
    u, vh = u * signs, vh * signs[:, None]
    root = s.clamp_min(0).sqrt()
    return (u * root).to(weight.dtype), (root[:, None] * vh).to(weight.dtype)
