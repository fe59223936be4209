"""The prune rule, pure: which rank slots of a layer stay, from their scales λ."""
from __future__ import annotations


def kept_slots(groups: list[list[float]], threshold: float, min_rank: int) -> list[list[int]]:
    """Per rank group, the slots with λ ≥ threshold, in order; at least `min_rank` of them (the largest λ) so a
    group never vanishes."""
    kept = []
    for lam in groups:
        idx = [k for k, value in enumerate(lam) if value >= threshold]
        floor = min(min_rank, len(lam))
        if len(idx) < floor:
            idx = sorted(sorted(range(len(lam)), key=lambda k: -lam[k])[:floor])
        kept.append(idx)
    return kept
