"""Factorized Linear and Conv2d: W ≈ U·V as two smaller layers applied in sequence.

Linear: `first` = Linear(in → r, no bias), `second` = Linear(r → out, bias).
Conv2d: `first` = k×k conv c_in → r (stride/padding/dilation/padding_mode of the original), `second` =
1×1 conv r → c_out (bias). Factors come from the truncated SVD (spectral init, `from_dense`) or are given
precomputed (`from_factors`), so a backend can compute them once on one rank and broadcast them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dist_lowrank.layers.shapes import is_hf_conv1d, matrix_dims, weight_matrix
from dist_lowrank.linalg import truncated_svd_factors


def _check_rank(rank: int, m: int, n: int) -> None:
    if isinstance(rank, bool) or int(rank) != rank or not 1 <= rank <= min(m, n):
        raise ValueError(f"rank: got {rank!r}; allowed: 1..{min(m, n)} for a {m}x{n} weight")


def _check_factors(dense: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """A must be m×r and B r×n for the dense layer's (m, n): a wrong broadcast is caught here, by name."""
    m, n = matrix_dims(dense)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != m or b.shape[1] != n or a.shape[1] != b.shape[0]:
        raise ValueError(f"factors: A {tuple(a.shape)} @ B {tuple(b.shape)} does not give the {m}x{n} weight "
                         f"of this {type(dense).__name__}")


class LowRankLinear(nn.Module):
    """y = second(first(x)) with first: in → rank (no bias), second: rank → out."""

    LAYOUT_TYPE = "lowrank"  # checkpoint manifests record {"type": "lowrank", "rank": r} (checkpoint.manifest)

    def layout(self) -> dict:
        return {"type": self.LAYOUT_TYPE, "rank": int(self.rank)}

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        _check_rank(rank, out_features, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def rank(self) -> int:
        return self.first.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    @classmethod
    def from_factors(cls, dense: nn.Module, a: torch.Tensor, b: torch.Tensor) -> "LowRankLinear":
        """W ≈ a @ b with a (out × r), b (r × in); bias copied from `dense` (Linear, HF Conv1D or InRank).

        The dense weight is never read (it may be a ZeRO-3 / FSDP2 shard); the new layer takes the
        factors' dtype and device, so the caller decides both.
        """
        _check_factors(dense, a, b)
        out_f, in_f = matrix_dims(dense)
        bias = getattr(dense, "bias", None)
        layer = cls(in_f, out_f, a.shape[1], bias=bias is not None, device=a.device, dtype=a.dtype)
        with torch.no_grad():
            layer.first.weight.copy_(b)
            layer.second.weight.copy_(a)
            if bias is not None:
                layer.second.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_dense(cls, dense: nn.Module, rank: int) -> "LowRankLinear":
        """Spectral init: truncated SVD of the dense weight (nn.Linear or HF Conv1D) at `rank`."""
        if not (isinstance(dense, nn.Linear) or is_hf_conv1d(dense)):
            raise TypeError(f"LowRankLinear.from_dense: expected nn.Linear or HF Conv1D, got {type(dense).__name__}")
        _check_rank(rank, *matrix_dims(dense))
        a, b = truncated_svd_factors(weight_matrix(dense).detach(), rank)
        return cls.from_factors(dense, a, b)

    def to_dense(self) -> nn.Linear:
        """The product as one nn.Linear (W = second.weight @ first.weight)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.second.bias is not None,
                          device=self.first.weight.device, dtype=self.first.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.second.weight @ self.first.weight)
            if self.second.bias is not None:
                dense.bias.copy_(self.second.bias)
        return dense


class LowRankConv2d(nn.Module):
    """k×k conv c_in → r, then 1×1 conv r → c_out (Cuttlefish's factorized convolution).

    Built from the dense conv it replaces (for kernel, stride, padding, dilation, padding_mode); the
    weights of `conv` are not read. device/dtype default to the conv weight's.
    """

    LAYOUT_TYPE = "lowrank"

    def layout(self) -> dict:
        return {"type": self.LAYOUT_TYPE, "rank": int(self.rank)}

    def __init__(self, conv: nn.Conv2d, rank: int, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if conv.groups != 1:
            raise ValueError(f"LowRankConv2d: groups={conv.groups} is not supported (only groups=1)")
        _check_rank(rank, *matrix_dims(conv))
        kwargs = dict(device=device or conv.weight.device, dtype=dtype or conv.weight.dtype)
        self.first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                               bias=False, padding_mode=conv.padding_mode, **kwargs)
        self.second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **kwargs)

    @property
    def rank(self) -> int:
        return self.first.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> "LowRankConv2d":
        """W (c_out × c_in·k·k) ≈ a @ b; b reshaped into the k×k conv, a into the 1×1 conv."""
        if conv.groups != 1:
            raise ValueError(f"LowRankConv2d: groups={conv.groups} is not supported (only groups=1)")
        _check_factors(conv, a, b)
        layer = cls(conv, a.shape[1], device=a.device, dtype=a.dtype)
        with torch.no_grad():
            layer.first.weight.copy_(b.reshape(layer.first.weight.shape))
            layer.second.weight.copy_(a.reshape(layer.second.weight.shape))
            if conv.bias is not None:
                layer.second.bias.copy_(conv.bias.detach())
        return layer

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank: int) -> "LowRankConv2d":
        """Spectral init from the truncated SVD of the (c_out × c_in·k·k) weight."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"LowRankConv2d.from_dense: expected nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"LowRankConv2d: groups={conv.groups} is not supported (only groups=1)")
        _check_rank(rank, *matrix_dims(conv))
        a, b = truncated_svd_factors(weight_matrix(conv).detach(), rank)
        return cls.from_factors(conv, a, b)

    def to_dense(self) -> nn.Conv2d:
        """The product as one k×k conv."""
        f, s = self.first, self.second
        dense = nn.Conv2d(f.in_channels, s.out_channels, f.kernel_size, f.stride, f.padding, f.dilation,
                          bias=s.bias is not None, padding_mode=f.padding_mode,
                          device=f.weight.device, dtype=f.weight.dtype)
        with torch.no_grad():
            w = s.weight.reshape(s.out_channels, -1) @ f.weight.reshape(f.out_channels, -1)
            dense.weight.copy_(w.reshape(dense.weight.shape))
            if s.bias is not None:
                dense.bias.copy_(s.bias)
        return dense


def _is_linear_shaped(module: nn.Module) -> bool:
    """A method's own Linear-like layer (declares in_features/out_features, e.g. InRank's W0 + U Vᵀ)."""
    return isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)


def build_factorized(dense: nn.Module, a: torch.Tensor, b: torch.Tensor) -> nn.Module:
    """The factorized replacement of a Linear / Conv2d / HF Conv1D (or a method's Linear-shaped layer, e.g.
    efficient InRank's fold of W0 + U Vᵀ) from precomputed factors A (m×r), B (r×n)."""
    if isinstance(dense, nn.Conv2d):
        return LowRankConv2d.from_factors(dense, a, b)
    if isinstance(dense, nn.Linear) or is_hf_conv1d(dense) or _is_linear_shaped(dense):
        return LowRankLinear.from_factors(dense, a, b)
    raise TypeError(f"cannot factorize {type(dense).__name__} (Linear, Conv2d, Conv1D, Linear-shaped layers)")


def empty_factorized(dense: nn.Module, rank: int, device=None, dtype=None) -> nn.Module:
    """A factorized module of the right shapes with uninitialized values (meta-device rebuilds)."""
    if isinstance(dense, nn.Conv2d):
        return LowRankConv2d(dense, rank, device=device, dtype=dtype)
    out_f, in_f = matrix_dims(dense)
    return LowRankLinear(in_f, out_f, rank, bias=getattr(dense, "bias", None) is not None, device=device, dtype=dtype)
