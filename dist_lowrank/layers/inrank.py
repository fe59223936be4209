"""InRank layer: W = W0 + U·Vᵀ with a physical capacity and an active rank within it.

U (out × capacity) and V (in × capacity) are both stored tall, so that any data-parallel sharding
along their first dimension lets the r×r Gram matrices UᵀU and VᵀV be summed from local pieces
(the growth check then all-reduces O(r²) per layer, never a factor). Only the first `rank` columns
take part (slices: inactive entries get no gradient).
Growth within capacity only moves the boundary; growth past it builds a new module whose extra
columns of U are zero, so the function is unchanged at the moment of growth.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dist_lowrank.layers.lowrank import LowRankLinear
from dist_lowrank.linalg import truncated_svd_factors

W0_MODES = ("frozen", "trained", "none")


class InRankLinear(nn.Module):
    """y = x W0ᵀ + (x V[:, :r]) U[:, :r]ᵀ + b."""

    def __init__(self, in_features: int, out_features: int, rank: int, capacity: int, w0_mode: str = "frozen",
                 bias: bool = True, seed: int = 0) -> None:
        super().__init__()
        if w0_mode not in W0_MODES:
            raise ValueError(f"w0_mode: got {w0_mode!r}; allowed: {', '.join(W0_MODES)}")
        if not 1 <= rank <= capacity <= min(in_features, out_features):
            raise ValueError(f"need 1 <= rank ({rank}) <= capacity ({capacity}) <= {min(in_features, out_features)}")
        self.in_features, self.out_features, self.w0_mode = in_features, out_features, w0_mode
        self._rank, self.seed = rank, seed
        self.w0 = None if w0_mode == "none" else nn.Parameter(torch.zeros(out_features, in_features),
                                                                requires_grad=w0_mode == "trained")
        self.u = nn.Parameter(torch.zeros(out_features, capacity))
        self.v = nn.Parameter(torch.empty(in_features, capacity))
        if self.v.device.type != "meta":
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                self.v.copy_(torch.randn(in_features, capacity, generator=gen) / in_features ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def capacity(self) -> int:
        return tuple(getattr(self.u, "ds_shape", self.u.shape))[1]  # ZeRO-3 hides shapes (param.shape == (0,))

    def lowrank_part(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The active factors (U[:, :r], V[:, :r]); the low-rank update is U Vᵀ."""
        return self.u[:, : self._rank], self.v[:, : self._rank]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.lowrank_part()
        y = F.linear(x @ v, u, self.bias)
        return y if self.w0 is None else y + F.linear(x, self.w0)

    @classmethod
    def from_dense(cls, dense: nn.Linear, rank: int, capacity: int, w0_mode: str = "frozen",
                   seed: int = 0) -> "InRankLinear":
        """W0 = dense weight, U = 0 (function unchanged); w0_mode "none": spectral init of U, V instead."""
        layer = cls(dense.in_features, dense.out_features, rank, capacity, w0_mode, dense.bias is not None, seed)
        with torch.no_grad():
            if w0_mode == "none":
                a, b = truncated_svd_factors(dense.weight.detach(), capacity)
                layer.u.zero_()
                layer.v.zero_()
                layer.u[:, : a.shape[1]].copy_(a)
                layer.v[:, : b.shape[0]].copy_(b.T)
                layer.u[:, rank:].zero_()  # inactive columns carry nothing until activated
            else:
                layer.w0.copy_(dense.weight.detach())
            if dense.bias is not None:
                layer.bias.copy_(dense.bias.detach())
        return layer

    def grow(self, new_rank: int) -> None:
        """Activate more of the capacity. The function is unchanged because inactive U columns are
        zero and stay zero: they are zero at creation, get no gradient (sliced out of the forward), and
        decoupled weight decay keeps zeros at zero. So growth writes no tensor — it works the same on
        sharded parameters (FSDP2, ZeRO-3), where a column write would need a gather."""
        if new_rank < self._rank:
            raise ValueError(f"grow: rank {new_rank} < current {self._rank}; ranks never shrink")
        if new_rank > self.capacity:
            raise ValueError(f"grow: rank {new_rank} > capacity {self.capacity}; use with_capacity first")
        self._rank = new_rank

    @staticmethod
    def grown_factors(u: torch.Tensor, v: torch.Tensor, capacity: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full U, V at a larger capacity: old block kept, new U columns zero (function unchanged),
        new V columns seeded random (directions the new U columns can learn to use)."""
        gen = torch.Generator().manual_seed(seed)
        new_u = torch.zeros(u.shape[0], capacity, dtype=u.dtype, device=u.device)
        new_u[:, : u.shape[1]] = u
        new_v = (torch.randn(v.shape[0], capacity, generator=gen) / v.shape[0] ** 0.5).to(dtype=v.dtype,
                                                                                         device=v.device)
        new_v[:, : v.shape[1]] = v
        return new_u, new_v

    @classmethod
    def assemble(cls, old: "InRankLinear", u: torch.Tensor, v: torch.Tensor, rank: int) -> "InRankLinear":
        """A layer with new U, V but the *same* W0 and bias Parameter objects as `old` (under ZeRO-3 they
        stay partitioned, with their optimizer state; nothing of size m·n is allocated)."""
        with torch.device("meta"):
            new = cls(old.in_features, old.out_features, min(rank, u.shape[1]), u.shape[1], old.w0_mode,
                      old.bias is not None, seed=old.seed)
        new.u = nn.Parameter(u.to(dtype=old.u.dtype).clone())
        new.v = nn.Parameter(v.to(dtype=old.v.dtype).clone())
        new.w0 = old.w0
        new.bias = old.bias
        return new

    def with_capacity(self, capacity: int) -> "InRankLinear":
        """A new module with more capacity: old factors copied, new U columns zero, new V columns seeded random."""
        if capacity < self.capacity:
            raise ValueError(f"with_capacity: {capacity} < current capacity {self.capacity}")
        new = InRankLinear(self.in_features, self.out_features, self._rank, capacity, self.w0_mode,
                           self.bias is not None, seed=self.seed + capacity)
        with torch.no_grad():
            u, v = self.grown_factors(self.u.detach(), self.v.detach(), capacity, self.seed + capacity)
            new.u.copy_(u)
            new.v.copy_(v)
            if self.w0 is not None:
                new.w0.copy_(self.w0)
            if self.bias is not None:
                new.bias.copy_(self.bias)
        return new.to(device=self.u.device, dtype=self.u.dtype)

    def fold(self, rank: Optional[int] = None) -> LowRankLinear:
        """Efficient InRank: W0 + U V as a pure factorization at `rank` (default: the active rank)."""
        with torch.no_grad():
            u, v = self.lowrank_part()
            w = u @ v.T if self.w0 is None else self.w0 + u @ v.T
            a, b = truncated_svd_factors(w, rank or self._rank)
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        if self.bias is not None:
            dense.bias.data.copy_(self.bias.detach())
        return LowRankLinear.from_factors(dense, a, b)
