"""InRank layer: W = W0 + U·Vᵀ with a physical capacity and an active rank within it.

U (out × capacity) and V (in × capacity) are both stored tall, so that any data-parallel sharding
along their first dimension lets the r×r Gram matrices UᵀU and VᵀV be summed from local pieces
(the growth check then all-reduces O(r²) per layer, never a factor). Only the first `rank` columns
take part (slices: inactive entries get no gradient).

The growth rule, which keeps the function unchanged: **inactive columns of U are zero**. They are
zero at creation, receive no gradient while inactive (sliced out of the forward), and decoupled
weight decay keeps zeros at zero; so activating them (`grow`) adds U[:, r:r'] V[:, r:r']ᵀ = 0.
Their V columns are small random (seeded), so the new U columns get a useful gradient at once.
Growth past capacity (`with_capacity`) builds a new module by the same rule.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dist_lowrank.layers.lowrank import LowRankLinear
from dist_lowrank.linalg import truncated_svd_factors

W0_MODES = ("frozen", "trained", "none")


def _random_v(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Small random V columns (std 1/√in), from a CPU generator so every process draws the same."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) / rows ** 0.5


class InRankLinear(nn.Module):
    """y = x W0ᵀ + (x V[:, :r]) U[:, :r]ᵀ + b.

    w0_mode: "frozen" (W0 fixed, the InRank paper's cumulative-update view), "trained" (W0 learns too)
    or "none" (no W0: W = U Vᵀ only, as in the released InRank code).
    `seed` fixes V's random columns (at creation and at every capacity growth).
    """

    RESHAPE_ATTRS = ("_rank",)  # Python-side state a rebuild from a skeleton must carry over (reshape.change)
    LAYOUT_TYPE = "inrank"      # checkpoint manifests record {"type": "inrank", "width", "capacity"}

    def __init__(self, in_features: int, out_features: int, rank: int, capacity: int, w0_mode: str = "frozen",
                 bias: bool = True, seed: int = 0, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if w0_mode not in W0_MODES:
            raise ValueError(f"w0_mode: got {w0_mode!r}; allowed: {', '.join(W0_MODES)}")
        if not 1 <= rank <= capacity <= min(in_features, out_features):
            raise ValueError(f"need 1 <= rank ({rank}) <= capacity ({capacity}) <= {min(in_features, out_features)}")
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.w0_mode = in_features, out_features, w0_mode
        self._rank, self.seed = rank, seed
        self.w0 = None if w0_mode == "none" else nn.Parameter(torch.zeros(out_features, in_features, **kw),
                                                                requires_grad=w0_mode == "trained")
        self.u = nn.Parameter(torch.zeros(out_features, capacity, **kw))
        self.v = nn.Parameter(torch.empty(in_features, capacity, **kw))
        if self.v.device.type != "meta":
            with torch.no_grad():
                self.v.copy_(_random_v(in_features, capacity, seed))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def capacity(self) -> int:
        return tuple(getattr(self.u, "ds_shape", self.u.shape))[1]  # ZeRO-3 hides shapes (param.shape == (0,))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self._rank}, "
                f"capacity={self.capacity}, w0_mode={self.w0_mode!r}")

    def layout(self) -> dict:
        return {"type": self.LAYOUT_TYPE, "width": int(self.rank), "capacity": int(self.capacity)}

    def with_layout(self, entry: dict) -> "InRankLinear":
        """This layer at a checkpoint's capacity and active width (a new module when the capacity differs)."""
        grown = self.with_capacity(int(entry["capacity"])) if entry["capacity"] != self.capacity else self
        if entry["width"] != grown.rank:
            grown.grow(int(entry["width"]))
        return grown

    def lowrank_part(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The active factors (U[:, :r] out×r, V[:, :r] in×r); the low-rank update is U Vᵀ."""
        return self.u[:, : self._rank], self.v[:, : self._rank]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.lowrank_part()
        y = F.linear(x @ v, u, self.bias)
        return y if self.w0 is None else y + F.linear(x, self.w0)

    @classmethod
    def from_dense(cls, dense: nn.Linear, rank: int, capacity: int, w0_mode: str = "frozen",
                   seed: int = 0) -> "InRankLinear":
        """W0 = dense weight, U = 0, V small random: the function is unchanged at start.

        w0_mode "none" has no W0, so the factors carry the function: spectral init (U√Σ, V√Σ of the
        truncated SVD) on the active columns; inactive U columns zero (the growth rule), inactive V
        columns the next singular directions.
        """
        if not isinstance(dense, nn.Linear):
            raise TypeError(f"InRankLinear.from_dense: expected nn.Linear, got {type(dense).__name__}")
        weight = dense.weight.detach()
        layer = cls(dense.in_features, dense.out_features, rank, capacity, w0_mode, dense.bias is not None, seed,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            if w0_mode == "none":
                a, b = truncated_svd_factors(weight, capacity)
                layer.u.copy_(a)
                layer.v.copy_(b.T)
                layer.u[:, rank:].zero_()
            else:
                layer.w0.copy_(weight)
            if dense.bias is not None:
                layer.bias.copy_(dense.bias.detach())
        return layer

    def grow(self, new_rank: int) -> None:
        """Activate more of the capacity. Writes no tensor (inactive U columns are already zero, see the
        module docstring), so it works the same on sharded parameters (FSDP2, ZeRO-3)."""
        if new_rank < self._rank:
            raise ValueError(f"grow: rank {new_rank} < current {self._rank}; ranks never shrink")
        if new_rank > self.capacity:
            raise ValueError(f"grow: rank {new_rank} > capacity {self.capacity}; use with_capacity first")
        self._rank = int(new_rank)

    @staticmethod
    def grown_factors(u: torch.Tensor, v: torch.Tensor, capacity: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full U, V at a larger capacity: old block kept, new U columns zero (function unchanged),
        new V columns seeded random (directions the new U columns can learn to use)."""
        new_u = torch.zeros(u.shape[0], capacity, dtype=u.dtype, device=u.device)
        new_u[:, : u.shape[1]] = u
        new_v = _random_v(v.shape[0], capacity, seed).to(dtype=v.dtype, device=v.device)
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
        """A new module with more capacity: old factors copied, new U columns zero, new V columns random
        from seed `self.seed + capacity` (the same draw every backend makes via `grown_factors`)."""
        if capacity < self.capacity:
            raise ValueError(f"with_capacity: {capacity} < current capacity {self.capacity}")
        ref = self.u.detach()
        new = InRankLinear(self.in_features, self.out_features, self._rank, capacity, self.w0_mode,
                           self.bias is not None, seed=self.seed, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            u, v = self.grown_factors(ref, self.v.detach(), capacity, self.seed + capacity)
            new.u.copy_(u)
            new.v.copy_(v)
            if self.w0 is not None:
                new.w0.copy_(self.w0)
            if self.bias is not None:
                new.bias.copy_(self.bias)
        return new

    def fold(self, rank: Optional[int] = None) -> LowRankLinear:
        """Efficient InRank: W0 + U Vᵀ as a pure factorization, truncated SVD at `rank` (default: active rank)."""
        with torch.no_grad():
            u, v = self.lowrank_part()
            w = u @ v.T if self.w0 is None else self.w0 + u @ v.T
            a, b = truncated_svd_factors(w, rank or self._rank)
        return LowRankLinear.from_factors(self, a, b)
