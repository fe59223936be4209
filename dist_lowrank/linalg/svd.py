"""Truncated SVD split W ≈ (U√Σ)(√ΣVᵀ) — the spectral initialization of a factor pair."""
from __future__ import annotations

import torch


FP64_MAX_NUMEL = 1 << 20


def truncated_svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (m×r) = U√Σ, B (r×n) = √ΣVᵀ of a 2-D weight, returned in the weight's dtype.

    The SVD runs in fp64 up to FP64_MAX_NUMEL elements (cheap, and stable for nearly equal singular
    values) and in fp32 above (several times faster on large layers; the truncation error is far
    above fp32 round-off).

    Signs are fixed (largest-magnitude entry of each column of U positive) so results are reproducible.
    `rank` is clipped to min(m, n).
    """
    if weight.dim() != 2:
        raise ValueError(f"truncated_svd_factors: expected a 2-D matrix, got shape {tuple(weight.shape)}")
    if rank < 1:
        raise ValueError(f"rank: got {rank}; allowed: an int >= 1")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("truncated_svd_factors: the weight has NaN/Inf entries")
    w = weight.detach().to(torch.float64 if weight.numel() <= FP64_MAX_NUMEL else torch.float32)
    r = min(rank, min(w.shape))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivot, torch.arange(r)])
    signs[signs == 0] = 1.0
    u, vh = u * signs, vh * signs[:, None]
    root = s.clamp_min(0).sqrt()
    return (u * root).to(weight.dtype), (root[:, None] * vh).to(weight.dtype)
