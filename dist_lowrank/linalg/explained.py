"""InRank's explained-variance rank rule on singular values (DESIGN.md §2)."""
from __future__ import annotations

import torch


def explained_ratio(s: torch.Tensor, k: int) -> float:
    """g(k) = 1 − var(s − s_{:k}) / var(s), where s_{:k} keeps the first k entries and zeroes the rest.

    var(s) == 0 (all singular values equal, or a single one) is defined as fully explained: 1.0.
    """
    s = s.detach().to(torch.float64).flatten()
    total = float(s.var(unbiased=False)) if s.numel() > 1 else 0.0
    if total == 0.0:
        return 1.0
    kept = s.clone()
    kept[k:] = 0.0
    return 1.0 - float((s - kept).var(unbiased=False)) / total


def explained_variance_rank(s: torch.Tensor, tau: float, start: int, stop: int) -> int:
    """First k in [start, stop) with g(k) > tau; `stop` when none qualifies (the caller caps it)."""
    for k in range(max(start, 0), stop):
        if explained_ratio(s, k) > tau:
            return k
    return stop
