"""DLRT layer: W = U S Vᵀ at a physical capacity c, active rank r ≤ c.

Parameters: `k` (m×c), `l` (n×c), `s` (c×c) are trained by the user's optimizer; `u` (m×c) and `v` (n×c) are
frozen parameters (requires_grad False: no optimizer state, no weight decay eroding their orthonormality; sharded
by ZeRO-3 / FSDP2 like the others) that only the integrator writes. Between steps K = U S and L = V Sᵀ.

The forward is y = ((x V) Sᵀ) Uᵀ + b on the active r columns. Its backward (a custom autograd Function) gives the
integrator's gradients in one pass: ∂/∂K = G V, ∂/∂L = Gᵀ U, ∂/∂S = Uᵀ G V, G = gyᵀ x the weight's gradient —
the K-, L- and S-steps of the paper's integrator, all at the current weight, with no S⁻¹. They are linear in G, so
every engine's gradient averaging (DDP all-reduce, ZeRO / FSDP2 reduce-scatter) is the right one for them.
Columns past the active rank are zero in every tensor and get zero gradients, so a capacity change by Slice or
Embed leaves the function unchanged. With `record` set (the KLS integrator), the backward also keeps
(x, gy) of the step for the core's fourth block (integrator.cross_block).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


class _DLRTMatmul(torch.autograd.Function):
    """y = ((x V) Sᵀ) Uᵀ with the integrator's gradients for K, L, S (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, k: torch.Tensor,
                l: torch.Tensor, recorder: Optional[list], s_only: bool) -> torch.Tensor:
        z = x @ v
        ctx.save_for_backward(x, u, s, v, z)
        ctx.recorder, ctx.s_only = recorder, s_only
        return (z @ s.T) @ u.T

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor):
        x, u, s, v, z = ctx.saved_tensors
        gw = gy @ u                      # (…, r): the output gradient in U's coordinates
        grad_x = (gw @ s) @ v.T
        x2, gy2 = x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
        z2, gw2 = z.reshape(-1, z.shape[-1]), gw.reshape(-1, gw.shape[-1])
        grad_s = gw2.T @ z2              # Uᵀ G V
        if ctx.s_only:
            grad_k, grad_l = torch.zeros_like(u), torch.zeros_like(v)
        else:
            grad_k = gy2.T @ z2          # G V
            grad_l = x2.T @ gw2          # Gᵀ U
        if ctx.recorder is not None:
            ctx.recorder.append((x2.detach(), gy2.detach()))
        return grad_x, None, grad_s, None, grad_k, grad_l, None, None


class DLRTLinear(nn.Module):
    """A Linear (or HF Conv1D) layer trained by DLRT: y = x (U S Vᵀ)ᵀ + b, rank adapted by the integrator."""

    RESHAPE_ATTRS = ("_rank", "s_only", "record")  # Python-side state carried across skeleton rebuilds (reshape.change)
    LAYOUT_TYPE = "dlrt"                 # checkpoint manifests record {"type": "dlrt", "rank", "capacity"}

    def __init__(self, in_features: int, out_features: int, rank: int, capacity: int, bias: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if not 1 <= rank <= capacity <= min(in_features, out_features):
            raise ValueError(f"DLRTLinear: need 1 <= rank ({rank}) <= capacity ({capacity}) <= "
                             f"{min(in_features, out_features)}")
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self._rank = in_features, out_features, int(rank)
        self.s_only, self.record = False, False  # only S trains (fine-tuning); keep (x, gy) for the KLS integrator
        self.u = nn.Parameter(torch.zeros(out_features, capacity, **kw), requires_grad=False)
        self.v = nn.Parameter(torch.zeros(in_features, capacity, **kw), requires_grad=False)
        self.s = nn.Parameter(torch.zeros(capacity, capacity, **kw))
        self.k = nn.Parameter(torch.zeros(out_features, capacity, **kw))
        self.l = nn.Parameter(torch.zeros(in_features, capacity, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.records: Optional[list] = None  # (x, gy) pairs since the integrator last consumed them

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def capacity(self) -> int:
        return tuple(getattr(self.s, "ds_shape", self.s.shape))[0]  # ZeRO-3 hides shapes (param.shape == (0,))

    def set_rank(self, rank: int) -> None:
        if not 1 <= rank <= self.capacity:
            raise ValueError(f"DLRTLinear.set_rank: {rank} outside 1..{self.capacity}")
        self._rank = int(rank)

    def layout(self) -> dict:
        return {"type": self.LAYOUT_TYPE, "rank": int(self._rank), "capacity": int(self.capacity)}

    def with_layout(self, entry: dict) -> "DLRTLinear":
        """This layer at a checkpoint's capacity and rank (values come from the checkpoint)."""
        layer = self if int(entry["capacity"]) == self.capacity else DLRTLinear(
            self.in_features, self.out_features, int(entry["rank"]), int(entry["capacity"]), self.bias is not None,
            device=self.s.device, dtype=self.s.dtype)
        layer._rank = int(entry["rank"])
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self._rank}, "
                f"capacity={self.capacity}")

    def weight_matrix(self) -> torch.Tensor:
        """U S Vᵀ (m×n) of the active rank (tests, export)."""
        r = self._rank
        return self.u[:, :r] @ self.s[:r, :r] @ self.v[:, :r].T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self._rank
        if self.record and self.records is None:
            self.records = []
        y = _DLRTMatmul.apply(x, self.u[:, :r], self.s[:r, :r], self.v[:, :r], self.k[:, :r], self.l[:, :r],
                              self.records if self.record else None, self.s_only)
        return y if self.bias is None else y + self.bias

    @classmethod
    def from_matrix(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], rank: int, capacity: int
                    ) -> "DLRTLinear":
        """U S Vᵀ = the rank-`rank` truncated SVD of the m×n `weight` (K = U S, L = V S), bias copied."""
        m, n = weight.shape
        layer = cls(n, m, rank, capacity, bias is not None, device=weight.device, dtype=weight.dtype)
        u, sigma, vh = torch.linalg.svd(weight.detach().to(torch.promote_types(weight.dtype, torch.float32)),
                                        full_matrices=False)
        with torch.no_grad():
            layer.u[:, :rank].copy_(u[:, :rank])
            layer.v[:, :rank].copy_(vh[:rank].T)
            layer.s[:rank, :rank].copy_(torch.diag(sigma[:rank]))
            layer.k[:, :rank].copy_(u[:, :rank] * sigma[:rank])
            layer.l[:, :rank].copy_(vh[:rank].T * sigma[:rank])
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

