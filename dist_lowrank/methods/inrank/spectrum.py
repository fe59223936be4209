"""Singular values of each InRank layer's low-rank part U Vᵀ, from shards, with O(r²) bytes per layer.

The nonzero singular values of U Vᵀ (U: m×r, V: n×r) are the square roots of the eigenvalues of
S·(VᵀV)·S with S = (UᵀU)^½ — so only the two r×r Gram matrices are needed. Both factors are stored
tall, so a Gram is a sum over rows: each rank adds up the rows it holds and one all-reduce (for all
layers at once) finishes the job. A row split between two ranks (ZeRO-3 flat partitions cut rows)
is sent whole through a small boundary buffer (≤ 2 rows per rank), because its cross terms need both
halves. Replicated factors (DDP, ZeRO-1/2) need no communication.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_lowrank.device import comm_device, is_distributed
from dist_lowrank.shard_view import ShardView, row_runs


@dataclass
class GramStats:
    collectives: int = 0
    bytes: int = 0


def singular_values_from_grams(gram_u: torch.Tensor, gram_v: torch.Tensor) -> torch.Tensor:
    """σ(U Vᵀ) in descending order from UᵀU and VᵀV (fp64, r×r each)."""
    evals, evecs = torch.linalg.eigh(gram_u.double())
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    middle = root @ gram_v.double() @ root
    values = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt()
    return values.flip(0)


def _local_gram(view: ShardView, k: int) -> tuple[torch.Tensor, list[tuple[int, int, torch.Tensor]]]:
    """Gram of the whole rows held here, plus the partial rows (row, first column, values)."""
    rows, cols = view.dims
    values = view.local_flat.detach().reshape(-1).double()
    gram = torch.zeros(k, k, dtype=torch.float64, device=values.device)
    partial = []
    for row, col, start, count in row_runs(view.flat_offset, values.numel(), cols):
        if col < 0:
            block = values[start: start + count * cols].view(count, cols)[:, :k]
            gram += block.T @ block
        else:
            partial.append((row, col, values[start: start + count]))
    return gram, partial


def gram_matrices(views: list[ShardView], active: list[int]) -> tuple[list[torch.Tensor], GramStats]:
    """X[:, :k]ᵀ X[:, :k] for each tall factor view (k = active columns), identical on every rank."""
    stats = GramStats()
    distributed = is_distributed()
    world = dist.get_world_size() if distributed else 1
    me = dist.get_rank() if distributed else 0
    grams: list[torch.Tensor] = [torch.zeros(0)] * len(views)
    sharded = []
    for i, (view, k) in enumerate(zip(views, active)):
        if view.replicated or not distributed:
            matrix = view.local_flat.detach().reshape(view.dims).double()[:, :k]
            grams[i] = matrix.T @ matrix
        else:
            sharded.append(i)
    if not sharded:
        return grams, stats
    payload, layout = [], []
    device = views[sharded[0]].local_flat.device  # Grams and boundary rows live with the shards (CUDA under NCCL)
    for i in sharded:
        view, k = views[i], active[i]
        cols = view.dims[1]
        gram, partial = _local_gram(view, k)
        if len(partial) > 2:
            raise RuntimeError(f"{view.name}: a contiguous shard has more than two partial rows")
        boundary = torch.zeros(2 * world, cols + 1, dtype=torch.float64, device=device)  # last column: row + 1
        for slot, (row, col, piece) in enumerate(partial):
            boundary[2 * me + slot, col: col + piece.numel()] = piece
            boundary[2 * me + slot, cols] = row + 1
        payload += [gram.reshape(-1), boundary.reshape(-1)]
        layout.append((i, k, cols))
    flat = torch.cat(payload).to(comm_device())
    dist.all_reduce(flat)
    stats.collectives += 1
    stats.bytes += flat.numel() * flat.element_size()
    flat = flat.to(device)
    offset = 0
    for i, k, cols in layout:
        gram = flat[offset: offset + k * k].view(k, k).clone()
        offset += k * k
        boundary = flat[offset: offset + 2 * world * (cols + 1)].view(2 * world, cols + 1)
        offset += 2 * world * (cols + 1)
        whole: dict[int, torch.Tensor] = {}
        row_ids = boundary[:, cols].tolist()  # one device-to-host copy for all slots
        for slot in range(2 * world):
            row = int(row_ids[slot]) - 1
            if row >= 0:
                whole[row] = whole.get(row, torch.zeros(cols, dtype=torch.float64, device=device)) + boundary[slot, :cols]
        for row_values in whole.values():
            piece = row_values[:k]
            gram += torch.outer(piece, piece)
        grams[i] = gram
    return grams, stats


def lowrank_singular_values(u_views: list[ShardView], v_views: list[ShardView], ranks: list[int]
                            ) -> tuple[list[torch.Tensor], GramStats]:
    """σ(U[:, :r] V[:, :r]ᵀ) per layer from shard views of U (m×cap) and V (n×cap); one all-reduce."""
    grams, stats = gram_matrices(u_views + v_views, ranks + ranks)
    count = len(u_views)
    return [singular_values_from_grams(grams[i], grams[count + i]) for i in range(count)], stats
