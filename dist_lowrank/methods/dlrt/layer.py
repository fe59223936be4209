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
(x, gy) of the step for the core's fourth block (`cross_block`).

DLRTConv2d is the same factorization of a conv's c_out × c_in·k·k weight, run as a k×k conv into r channels
(the rows of Vᵀ as kernels), then S and U as one 1×1 conv — never an unfold; its backward gets G V, Gᵀ U and
Uᵀ G V from the same convolutions' input and weight gradients.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight


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
        grad_x = (gw @ s) @ v.T if ctx.needs_input_grad[0] else None
        x2, gy2 = x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
        z2, gw2 = z.reshape(-1, z.shape[-1]), gw.reshape(-1, gw.shape[-1])
        grad_gv = gy2.T @ z2             # G V
        grad_s = u.T @ grad_gv           # Uᵀ G V, from G V (m·r² instead of a second pass over the batch)
        if ctx.s_only:
            grad_k, grad_l = torch.zeros_like(u), torch.zeros_like(v)
        else:
            grad_k = grad_gv
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

    def resized(self, rank: int, capacity: int, device: Optional[torch.device] = None,
                dtype: Optional[torch.dtype] = None) -> "DLRTLinear":
        """An empty layer of the same geometry at another rank and capacity (modes carried over)."""
        layer = DLRTLinear(self.in_features, self.out_features, rank, capacity, self.bias is not None,
                           device=device, dtype=dtype)
        layer.s_only, layer.record = self.s_only, self.record
        return layer

    def with_layout(self, entry: dict) -> "DLRTLinear":
        """This layer at a checkpoint's capacity and rank (values come from the checkpoint)."""
        layer = self if int(entry["capacity"]) == self.capacity else self.resized(
            int(entry["rank"]), int(entry["capacity"]), device=self.s.device, dtype=self.s.dtype)
        layer._rank = int(entry["rank"])
        return layer

    def cross_block(self, u_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        """Ũᵀ G Ṽ of this rank's recorded batch (KLS's fourth core block), G = Σ gyᵀ x; the records are consumed."""
        out = u_new.new_zeros(u_new.shape[1], v_new.shape[1])
        for x, gy in self.records or []:
            out += (gy.to(u_new.dtype) @ u_new).T @ (x.to(v_new.dtype) @ v_new)
        self.records = None
        return out

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
        return layer.load_svd(weight, bias)

    def load_svd(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> "DLRTLinear":
        """Fill the factors from the truncated SVD of the m×n `weight` at this layer's rank; bias copied."""
        layer, rank = self, self._rank
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



class _DLRTConv(torch.autograd.Function):
    """y = conv1x1(conv_k×k(x, Vᵀ as r kernels), U S) with the integrator's gradients for K, L, S (as _DLRTMatmul,
    G the gradient of the c_out × c_in·k·k weight matrix)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, k: torch.Tensor,
                l: torch.Tensor, recorder: Optional[list], s_only: bool, geometry: dict) -> torch.Tensor:
        kernels = v.T.reshape(v.shape[1], *geometry["kernel_shape"])
        z = F.conv2d(x, kernels, None, geometry["stride"], geometry["padding"], geometry["dilation"])
        ctx.save_for_backward(x, u, s, v, z)
        ctx.recorder, ctx.s_only, ctx.geometry = recorder, s_only, geometry
        return F.conv2d(z, (u @ s)[:, :, None, None])

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor):
        x, u, s, v, z = ctx.saved_tensors
        geo = ctx.geometry
        conv = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"])
        r = v.shape[1]
        gw = F.conv2d(gy, u.T[:, :, None, None])           # Uᵀ gy at every position (a 1×1 conv)
        grad_x = None
        if ctx.needs_input_grad[0]:                         # Sᵀ Uᵀ gy through the k×k conv's input gradient
            kernels = v.T.reshape(r, *geo["kernel_shape"])
            grad_x = conv2d_input(x.shape, kernels, F.conv2d(gw, s.T[:, :, None, None]), **conv)
        grad_gv = conv2d_weight(z, (u.shape[0], r, 1, 1), gy).reshape(u.shape[0], r)  # G V = Σ gy zᵀ
        grad_s = u.T @ grad_gv                              # Uᵀ G V
        if ctx.s_only:
            grad_k, grad_l = torch.zeros_like(u), torch.zeros_like(v)
        else:
            grad_k = grad_gv
            grad_l = conv2d_weight(x, (r, *geo["kernel_shape"]), gw, **conv).reshape(r, -1).T  # Gᵀ U
        if ctx.recorder is not None:
            ctx.recorder.append((x.detach(), gy.detach()))
        return grad_x, None, grad_s, None, grad_k, grad_l, None, None, None


class DLRTConv2d(DLRTLinear):
    """A Conv2d (groups 1, zero padding) trained by DLRT on its c_out × c_in·k·k weight matrix (see the module
    docstring): in_features = c_in·k·k, out_features = c_out for the integrator, which never sees the geometry."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], rank: int, capacity: int,
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1), bias: bool = True, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        kh, kw = kernel_size
        super().__init__(in_channels * kh * kw, out_channels, rank, capacity, bias, device=device, dtype=dtype)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, capacity: int) -> "DLRTConv2d":
        """The conv's function truncated to `rank` (its c_out × c_in·k·k weight's SVD), bias copied."""
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"DLRTConv2d: needs groups=1, padding_mode='zeros' and numeric padding "
                             f"(got groups={conv.groups}, padding_mode={conv.padding_mode!r}, "
                             f"padding={conv.padding!r})")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank, capacity, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        return layer.load_svd(conv.weight.reshape(conv.out_channels, -1), conv.bias)

    def resized(self, rank: int, capacity: int, device: Optional[torch.device] = None,
                dtype: Optional[torch.dtype] = None) -> "DLRTConv2d":
        layer = DLRTConv2d(self.in_channels, self.out_channels, self.kernel_size, rank, capacity, self.stride,
                           self.padding, self.dilation, self.bias is not None, device=device, dtype=dtype)
        layer.s_only, layer.record = self.s_only, self.record
        return layer

    def _geometry(self) -> dict:
        return {"kernel_shape": (self.in_channels, *self.kernel_size), "stride": self.stride,
                "padding": self.padding, "dilation": self.dilation}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self._rank
        if self.record and self.records is None:
            self.records = []
        y = _DLRTConv.apply(x, self.u[:, :r], self.s[:r, :r], self.v[:, :r], self.k[:, :r], self.l[:, :r],
                            self.records if self.record else None, self.s_only, self._geometry())
        return y if self.bias is None else y + self.bias[:, None, None]

    def cross_block(self, u_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        """Ũᵀ G Ṽ from the recorded (x, gy): the k×k conv of x by Ṽ's kernels against Ũᵀ gy, summed."""
        geo = self._geometry()
        out = u_new.new_zeros(u_new.shape[1], v_new.shape[1])
        for x, gy in self.records or []:
            kernels = v_new.T.reshape(v_new.shape[1], *geo["kernel_shape"]).to(x.dtype)
            z = F.conv2d(x, kernels, None, geo["stride"], geo["padding"], geo["dilation"]).to(u_new.dtype)
            out += torch.einsum("bmhw,mp,bqhw->pq", gy.to(u_new.dtype), u_new, z)
        self.records = None
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, rank={self._rank}, capacity={self.capacity}")
