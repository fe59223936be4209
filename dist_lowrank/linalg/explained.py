"""InRank's explained-variance rank rule on singular values (DESIGN.md §2)."""
from __future__ import annotations

import torch


def _variance(x: torch.Tensor) -> float:
    """Population variance (numpy's default, as in the InRank reference); 0.0 for fewer than 2 entries."""
    return float(x.var(unbiased=False)) if x.numel() > 1 else 0.0


def explained_ratio(s: torch.Tensor, k: int) -> float:
    """g(k) = 1 − var(s − s_{:k}) / var(s), where s_{:k} keeps the first k entries and zeroes the rest.

    `s` is used in the given order (singular values, largest first). g(0) = 0 and g(len(s)) = 1.
    var(s) == 0 (all entries equal, or a single one) is defined as fully explained: 1.0.
    """
    if k < 0:
        raise ValueError(f"k: got {k}; allowed: an int >= 0")
    s = s.detach().to(torch.float64).flatten()
    total = _variance(s)
    if total == 0.0:
        return 1.0
    residual = s.clone()  # s − s_{:k}: zeros in the first k places, same length as s
    residual[:k] = 0.0
    return 1.0 - _variance(residual) / total


def explained_variance_rank(s: torch.Tensor, tau: float, start: int, stop: int) -> int:
    """First k in [start, stop) with g(k) > tau, or `stop` when none qualifies.

    Returning `stop` (not the last candidate) means "grow by the whole buffer": the caller caps it at
    its capacity and enforces that ranks never shrink.
    """
    for k in range(max(start, 0), stop):
        if explained_ratio(s, k) > tau:
            return k
    return stop
