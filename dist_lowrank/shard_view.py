"""How a targeted weight is laid out on this rank, in one shape every backend can produce.

Every layout is described as a contiguous slice of the row-major flattened (m × n) weight matrix:
- replicated (DDP, ZeRO-1/2): `owner_only=True`, this rank holds the whole matrix (offset 0, m·n values);
- row shard (FSDP2 `Shard(0)`): offset = first_row · n, the rows this rank holds;
- flat partition (ZeRO-3): offset = partition start, the rank's partition (padding removed).
The monitor multiplies with the local piece and all-reduces only m- and n-vectors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ShardView:
    """The piece of layer `name`'s (m × n) weight matrix that this rank holds.

    dims: (m, n) of the matrix view (conv: (c_out, c_in·k·k); HF Conv1D: (out, in)).
    flat_offset: index of local_flat[0] in the row-major flattened matrix.
    local_flat: 1-D tensor of the values held here (may be empty).
    replicated: True when every rank holds the whole matrix (the monitor then spreads layers over ranks
    instead of splitting each matrix).
    """

    name: str
    dims: tuple[int, int]
    flat_offset: int
    local_flat: torch.Tensor
    replicated: bool = False

    def __post_init__(self) -> None:
        m, n = self.dims
        end = self.flat_offset + self.local_flat.numel()
        if self.flat_offset < 0 or end > m * n:
            raise ValueError(f"{self.name}: shard [{self.flat_offset}, {end}) outside a {m}x{n} matrix")


def replicated_view(name: str, param: torch.Tensor) -> ShardView:
    """The whole parameter, held by every rank, viewed as (dim 0 × the rest)."""
    p = param.detach()
    return ShardView(name, (p.shape[0], p[0].numel()), 0, p.reshape(-1), replicated=True)


def row_runs(offset: int, length: int, n: int) -> list[tuple[int, int, int, int]]:
    """Split a flat slice of a row-major (· × n) matrix into (row, col_start, flat_start, count) runs.

    A run is a piece of one row; full rows in the middle are returned as one block run with
    col_start = -1 and count = number of rows (handled with one matmul).
    """
    runs: list[tuple[int, int, int, int]] = []
    pos, end, local = offset, offset + length, 0
    if length == 0:
        return runs
    row, col = divmod(pos, n)
    if col:
        take = min(n - col, end - pos)
        runs.append((row, col, local, take))
        pos, local = pos + take, local + take
    full_rows = (end - pos) // n
    if full_rows:
        runs.append((pos // n, -1, local, full_rows))
        pos, local = pos + full_rows * n, local + full_rows * n
    if pos < end:
        runs.append((pos // n, 0, local, end - pos))
    return runs
