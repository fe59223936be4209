"""Frobenius decay on factor pairs (instead of L2 on each factor): penalize ‖U V‖_F², not ‖U‖² + ‖V‖².

L2 on factors pulls U and V towards each other's scale rather than shrinking the product W = U V;
the gradient of λ/2 ‖U V‖_F² is grad_U = λ U V Vᵀ, grad_V = λ Uᵀ U V.
"""
from __future__ import annotations

import torch
from torch import nn

from dist_lowrank.layers.lowrank import LowRankConv2d, LowRankLinear


def factor_pairs(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(name, V-side weight `first`, U-side weight `second`) of every factorized layer."""
    return [(name, m.first.weight, m.second.weight) for name, m in model.named_modules()
            if isinstance(m, (LowRankLinear, LowRankConv2d))]


@torch.no_grad()
def frobenius_decay_(model: nn.Module, lam: float) -> None:
    """Add λ·U V Vᵀ to grad_U and λ·Uᵀ U V to grad_V of every pair (call after backward)."""
    if lam == 0:
        return
    for _, first, second in factor_pairs(model):
        u = second.reshape(second.shape[0], -1)  # m × r
        v = first.reshape(first.shape[0], -1)  # r × n
        uv = u @ v
        grad_u = lam * (uv @ v.T)
        grad_v = lam * (u.T @ uv)
        for param, grad in ((second, grad_u), (first, grad_v)):
            if param.grad is None:
                param.grad = grad.reshape(param.shape).clone()
            else:
                param.grad.add_(grad.reshape(param.shape))
