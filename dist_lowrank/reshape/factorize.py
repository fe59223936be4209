"""Factors computed once per layer, spread over ranks (the pipeline's Factor ops).

Layers are taken in rounds of `world_size`: in a round every rank takes part in gathering each layer
(a rank-0-only gather hangs) but keeps only the one it owns, then all owners run their SVDs at the
same time, then each owner broadcasts its factors. So no rank holds more than one full layer beyond
its shards (plus the one being gathered), and the SVD work runs in parallel instead of being repeated.
A failure on an owner is broadcast as a sentinel, and a failed fetch is agreed on at the end of its round,
so every rank stops with a named error.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from dist_lowrank.device import is_distributed

from dist_lowrank.coordinator import Coordinator
from dist_lowrank.errors import RemoteRankError
from dist_lowrank.faults import maybe_fault
from dist_lowrank.linalg import truncated_svd_factors


FP64_MAX_NUMEL = 1 << 16  # 256×256: above it an fp32 SVD is 1.7–2× faster (0.076 vs 0.13 s at 512² here)


def owner_of(index: int, world_size: int) -> int:
    """Round-robin owner of the index-th layer of a plan (plan order is sorted, identical on all ranks)."""
    return index % world_size


def factorize_spread(
    names: list[str],
    ranks: dict[str, int],
    fetch_full_matrix: Callable[[str], Optional[torch.Tensor]],
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return {name: (A, B)} with W ≈ A @ B (A = U√Σ, B = √ΣVᵀ) on every rank.

    `fetch_full_matrix(name)` is collective (every rank calls it, in `names` order) and returns the
    full (m × n) matrix on at least the owner rank. `device` is where collectives run (cuda for nccl).
    Works without an initialized process group (single process: everything is local).
    """
    device = device or torch.device("cpu")
    distributed = is_distributed()
    world = dist.get_world_size() if distributed else 1
    me = dist.get_rank() if distributed else 0
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for start in range(0, len(names), world):
        round_names = names[start:start + world]
        mine: Optional[tuple[str, Optional[torch.Tensor]]] = None
        gather_failure: Optional[Exception] = None
        for offset, name in enumerate(round_names):
            try:
                full = fetch_full_matrix(name)
                maybe_fault("gather")
            except Exception as exc:  # noqa: BLE001 - after this rank's share of the gathers: agreed on below
                gather_failure, full = gather_failure or exc, None
            if owner_of(start + offset, world) == me:
                mine = (name, None if full is None else full.detach())
            del full
        # One flag all-reduce per round: a rank whose fetch failed after its collectives (reshape, copy, memory)
        # ends every rank with its cause. A failure *inside* a gather is left to the process-group timeout.
        Coordinator().raise_if_any_failed(gather_failure, f"gathering {', '.join(round_names)}")
        factors, failure = _factorize_own(mine, ranks, dtype, device)
        for offset, name in enumerate(round_names):
            owner = owner_of(start + offset, world)
            out[name] = _share(name, owner, me, factors if owner == me else None, failure if owner == me else None,
                               dtype, device, distributed)
    return out


def _factorize_own(mine, ranks, dtype, device):
    """This rank's SVD for the round (if it owns a layer); an exception is returned, not raised."""
    if mine is None:
        return None, None
    name, full = mine
    try:
        maybe_fault("factorize")
        if full is None:
            raise RuntimeError(f"{name}: the owner rank did not receive the full weight")
        # fp64 is cheap on small layers; above 64k elements fp32 LAPACK is 1.7–2× faster, and its round-off
        # (~1e-7·σ_max) is far below the truncation error. One rank computes, so all ranks get the same factors.
        compute = torch.float64 if full.numel() <= FP64_MAX_NUMEL else torch.float32
        a, b = truncated_svd_factors(full.to(torch.float32), ranks[name], compute_dtype=compute)
        return (a.to(device=device, dtype=dtype).contiguous(), b.to(device=device, dtype=dtype).contiguous()), None
    except Exception as exc:  # noqa: BLE001 - shared with every rank by _share, then raised
        return None, exc


def _share(name, owner, me, factors, failure, dtype, device, distributed):
    """Broadcast one layer's factors from its owner (shape first, -1 = the owner failed)."""
    if me == owner:
        if factors is None:
            shape = torch.full((3,), -1, dtype=torch.long, device=device)
        else:
            a, b = factors
            shape = torch.tensor([a.shape[0], a.shape[1], b.shape[1]], dtype=torch.long, device=device)
    else:
        shape = torch.zeros(3, dtype=torch.long, device=device)
    if distributed:
        dist.broadcast(shape, src=owner)
    m, r, n = (int(v) for v in shape.tolist())
    if m < 0:  # every rank knows now: the owner sends its cause, so every rank's error names it
        cause = [f"{type(failure).__name__}: {failure}" if failure is not None else "unknown cause"]
        if distributed:
            dist.broadcast_object_list(cause, src=owner)
        message = f"factorizing {name} failed on rank {owner}: {cause[0]}"
        if failure is not None:
            raise RemoteRankError(message) from failure
        raise RemoteRankError(message)
    if me == owner:
        a, b = factors
    else:
        a = torch.empty(m, r, dtype=dtype, device=device)
        b = torch.empty(r, n, dtype=dtype, device=device)
    if distributed:
        dist.broadcast(a, src=owner)
        dist.broadcast(b, src=owner)
    return a, b
