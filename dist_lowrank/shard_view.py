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
