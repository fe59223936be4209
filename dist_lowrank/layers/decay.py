"""Frobenius decay on factor pairs (instead of L2 on each factor): penalize ‖U V‖_F², not ‖U‖² + ‖V‖².

L2 on factors pulls U and V towards each other's scale rather than shrinking the product W = U V
(Kamalakara et al.); the gradient of λ/2 ‖U V‖_F² is grad_U = λ U V Vᵀ, grad_V = λ Uᵀ U V.
Both are computed through the r×r Grams (V Vᵀ, Uᵀ U): O((m+n)r²), never the m×n product.
"""
from __future__ import annotations

import torch
from torch import nn

from dist_lowrank.layers.lowrank import LowRankConv2d, LowRankLinear


def _factor_params(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    return [(name, m.first.weight, m.second.weight) for name, m in model.named_modules()
            if isinstance(m, (LowRankLinear, LowRankConv2d))]


def factor_pairs(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, V = `first` weight r×n, U = `second` weight m×r) of every factorized layer, W = U V.

    Linear factors are the parameters themselves; conv factors are matrix views of them
    (first: (r, c_in·k·k), second: (c_out, r)).
    """
    return [(name, first if first.dim() == 2 else first.flatten(1), second if second.dim() == 2 else second.flatten(1))
            for name, first, second in _factor_params(model)]


def frobenius_penalty(model: nn.Module, lam: float) -> torch.Tensor:
    """λ/2 Σ ‖U V‖_F² as a loss term = λ/2 Σ ⟨UᵀU, V Vᵀ⟩ (r×r Grams).

    Its autograd gradient is exactly what `frobenius_decay_` adds; use it where an engine owns the
    gradients (DeepSpeed ZeRO reduces them into its own buffers during backward, so `.grad` edits
    after backward are not seen).
    """
    total = None
    for _, v, u in factor_pairs(model):
        term = ((u.T @ u) * (v @ v.T)).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * lam * total


@torch.no_grad()
def frobenius_decay_(model: nn.Module, lam: float) -> None:
    """Add λ·U (V Vᵀ) to grad_U and λ·(Uᵀ U) V to grad_V of every pair, in place (call after backward;
    a missing .grad is created). For plain modules and DDP (gradients already averaged, weights replicated)."""
    if lam == 0:
        return
    for _, first, second in _factor_params(model):
        u = second.reshape(second.shape[0], -1)  # m × r
        v = first.reshape(first.shape[0], -1)  # r × n
        grad_u = lam * (u @ (v @ v.T))
        grad_v = lam * ((u.T @ u) @ v)
        for param, grad in ((second, grad_u), (first, grad_v)):
            grad = grad.reshape(param.shape).to(param.dtype)
            if param.grad is None:
                param.grad = grad.clone()
            else:
                param.grad.add_(grad)
