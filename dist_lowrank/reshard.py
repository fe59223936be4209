"""Backend-neutral pieces of a reshard: factors computed once per layer, spread over ranks.

Each layer is gathered on its own (all ranks take part: a rank-0-only gather hangs), one rank — its
owner — runs the SVD, and the factors are broadcast. So no rank holds more than one full layer beyond
its shards, and the SVD work is spread instead of repeated on every rank.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from dist_lowrank.errors import RemoteRankError
from dist_lowrank.linalg import truncated_svd_factors


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
    full (m × n) matrix on at least the owner rank (other ranks may get None). Works without an
    initialized process group (single process: everything is local).
    """
    device = device or torch.device("cpu")
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    me = dist.get_rank() if distributed else 0
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for index, name in enumerate(names):
        full = fetch_full_matrix(name)
        owner = owner_of(index, world)
        failure: Optional[BaseException] = None
        if me == owner:
            try:
                if full is None:
                    raise RuntimeError(f"{name}: the owner rank {owner} did not receive the full weight")
                a, b = truncated_svd_factors(full.detach().to(torch.float32), ranks[name])
                a, b = a.to(device=device, dtype=dtype).contiguous(), b.to(device=device, dtype=dtype).contiguous()
                shape_msg = torch.tensor([a.shape[0], a.shape[1], b.shape[1]], dtype=torch.long, device=device)
            except Exception as exc:  # noqa: BLE001 - shared with every rank below, then raised
                failure = exc
                shape_msg = torch.full((3,), -1, dtype=torch.long, device=device)
        else:
            shape_msg = torch.zeros(3, dtype=torch.long, device=device)
        del full
        if distributed:
            dist.broadcast(shape_msg, src=owner)
        m, r, n = (int(v) for v in shape_msg.tolist())
        if m < 0:  # the owner failed: every rank stops here with the cause named
            message = f"factorizing {name} failed on rank {owner}"
            if failure is not None:
                raise RemoteRankError(f"{message}: {type(failure).__name__}: {failure}") from failure
            raise RemoteRankError(message + " (see that rank's log for the cause)")
        if distributed:
            if me != owner:
                a = torch.empty(m, r, dtype=dtype, device=device)
                b = torch.empty(r, n, dtype=dtype, device=device)
            dist.broadcast(a, src=owner)
            dist.broadcast(b, src=owner)
        out[name] = (a, b)
    return out
