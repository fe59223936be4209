"""Adam moments of a dense weight W projected onto its factors A (m×r), B (r×n), W ≈ A·B.

Why: at the switch the factors could start from zero moments (step 0) or continue W's history. The factors'
gradients are linear in W's gradient, G_A = G_W Bᵀ and G_B = Aᵀ G_W, with A, B held at their switch values,
so any exponential moving average of G_W maps exactly: EMA(G_A) = EMA(G_W) Bᵀ (first moments, momentum).
The second moments do not map exactly: (G_W Bᵀ)² needs cross terms of G_W's entries that Adam never kept;
the diagonal (independence) approximation drops them, EMA(G_A²) ≈ EMA(G_W²) (B∘B)ᵀ and
EMA(G_B²) ≈ (A∘A)ᵀ EMA(G_W²) (∘: elementwise square) — exact when at most one term of each sum is non-zero,
and non-negative always. Pure tensor math: no torch.distributed, no optimizer.
"""
from __future__ import annotations

import torch

SQUARED_KEYS = ("exp_avg_sq", "max_exp_avg_sq")  # second-moment states (Adam/AdamW, amsgrad); others map linearly


def project_linear(moment: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(moment Bᵀ, Aᵀ moment) for an m×n moment of W: exact for any EMA of W's gradients."""
    return moment @ b.T, a.T @ moment


def project_squared(moment: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(moment (B∘B)ᵀ, (A∘A)ᵀ moment) for an m×n second moment of W (diagonal approximation)."""
    return moment @ (b * b).T, (a * a).T @ moment


def project_state(state: dict, a: torch.Tensor, b: torch.Tensor) -> tuple[dict, dict]:
    """W's optimizer state (m×n matrices, already in W's matrix orientation) -> (A's state, B's state).

    Second-moment keys (SQUARED_KEYS) are projected with the squared factors, every other m×n tensor
    linearly (exp_avg, SGD's momentum_buffer); scalars (Adam's `step`) are copied to both, so the bias
    correction matches the carried moments. Computed in fp32 at least, on the moment's device; returned in each state's dtype.
    """
    m, n = a.shape[0], b.shape[1]
    out_a: dict = {}
    out_b: dict = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if tuple(value.shape) != (m, n):
                raise ValueError(f"{key}: moment of shape {tuple(value.shape)}, factors give a {m}x{n} weight")
            compute = torch.promote_types(value.dtype, torch.float32)
            fa, fb, mv = a.to(value.device, compute), b.to(value.device, compute), value.to(compute)
            pa, pb = (project_squared if key in SQUARED_KEYS else project_linear)(mv, fa, fb)
            out_a[key], out_b[key] = pa.to(value.dtype), pb.to(value.dtype)
        else:
            copy = value.detach().clone() if isinstance(value, torch.Tensor) else value
            out_a[key] = copy
            out_b[key] = copy.clone() if isinstance(copy, torch.Tensor) else copy
    return out_a, out_b
