"""The integrator's math on full fp32 tensors: pure functions, no torch.distributed, no engine.

One step, after the optimizer moved K = U S, L = V Sᵀ and S (K1, L1, S1; the gradients the layer gives them are
∂/∂K = G V, ∂/∂L = Gᵀ U, ∂/∂S = Uᵀ G V, G the weight's gradient — see layer.py):
- new directions, orthogonal to the old bases: Ũ = orth((I − U Uᵀ) K1), Ṽ = orth((I − V Vᵀ) L1) (two passes of
  Gram-Schmidt projection, then QR), so [U Ũ] and [V Ṽ] are orthonormal and span [U, K1], [V, L1];
- the augmented core, (r+p)×(r+q):
    parallel: [[S1, L1ᵀṼ], [ŨᵀK1, 0]]       — with plain SGD exactly W − λ·P_T(G), P_T the tangent projection;
    kls:      [[S1, L1ᵀṼ], [ŨᵀK1, −λ ŨᵀGṼ]] — the S step of the KLS integrator on the augmented bases: its
              gradient there is (ÛᵀGV̂) at the same weight (Û S̃ V̂ᵀ = U S Vᵀ), whose first three blocks the
              optimizer already took; the fourth comes from the batch's activations (the layer's `cross_block`);
- truncation by the core's SVD P Σ Qᵀ at the smallest j with ‖σ[j:]‖ < ϑ‖σ‖ (or < ϑ): U ← [U Ũ] P_j,
  V ← [V Ṽ] Q_j, S ← diag(σ_j); then K = U S, L = V S.
The reference code (DLRT-Net) uses the SVD's Vh as V; here V ← [V Ṽ] Q with Q = Vhᵀ (`truncate`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def new_directions(basis: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning (I − B Bᵀ)·update, at most min(r, m − r) of them (B: m×r orthonormal)."""
    m, r = basis.shape
    width = min(update.shape[1], m - r)
    if width <= 0:
        return update.new_zeros(m, 0)
    rest = update - basis @ (basis.T @ update)
    rest = rest - basis @ (basis.T @ rest)  # second pass: orthogonal to B to working precision
    q, _ = torch.linalg.qr(rest)
    q = q[:, :width]
    return q - basis @ (basis.T @ q)


def reorthonormalize(basis: torch.Tensor) -> torch.Tensor:
    """The nearest-by-QR orthonormal basis (signs kept: Q·sign(diag R) ≈ basis). Bases stored in bf16/fp16 are
    orthonormal only to their rounding; restoring it in fp32 every step keeps that error from accumulating (the
    weight U S Vᵀ moves by the storage's rounding, which it has anyway)."""
    q, r = torch.linalg.qr(basis)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs


def augmented_core(k1: torch.Tensor, l1: torch.Tensor, s1: torch.Tensor, u_new: torch.Tensor, v_new: torch.Tensor,
                   cross: Optional[torch.Tensor] = None, top_right: Optional[torch.Tensor] = None,
                   bottom_left: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[[S1, L1ᵀṼ], [ŨᵀK1, cross or 0]]: the (r+p)×(r+q) core of the step on the bases [U Ũ], [V Ṽ]
    (`top_right`, `bottom_left`: those blocks already summed over row shards)."""
    top = torch.cat([s1, l1.T @ v_new if top_right is None else top_right], dim=1)
    low_right = cross if cross is not None else s1.new_zeros(u_new.shape[1], v_new.shape[1])
    bottom = torch.cat([u_new.T @ k1 if bottom_left is None else bottom_left, low_right], dim=1)
    return torch.cat([top, bottom], dim=0)


def truncation_rank(sigma: torch.Tensor, theta: float, absolute: bool, min_rank: int, max_rank: int) -> int:
    """The smallest j with ‖σ[j:]‖ < ϑ·‖σ‖ (relative) or < ϑ (absolute), clamped to [min_rank, max_rank] and to
    len(σ). σ descending."""
    sigma = sigma.double()
    tails = torch.sqrt(torch.flip(torch.cumsum(torch.flip(sigma * sigma, [0]), 0), [0]))  # tails[j] = ‖σ[j:]‖
    tails = torch.cat([tails, tails.new_zeros(1)])
    limit = theta if absolute else theta * float(tails[0])
    below = (tails < limit).nonzero()
    j = int(below[0]) if len(below) else len(sigma)
    return max(min(j, max_rank, len(sigma)), min(min_rank, len(sigma)))


@dataclass
class Truncated:
    """The step's result at rank r1 (U m×r1, S r1×r1 diagonal, V n×r1) and the rotations of the old coordinates
    into the new ones (old U coordinates → new: P[:r, :r1]; old V coordinates → new: Q[:r, :r1])."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    sigma: torch.Tensor
    wanted: int  # the rank the tolerance asked for, before the capacity cap


def truncate(core: torch.Tensor, u_aug: torch.Tensor, v_aug: torch.Tensor, r: int, rank: int,
             svd: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None, wanted: Optional[int] = None
             ) -> Truncated:
    """U S Vᵀ of rank `rank` from the core's SVD (computed here, or rank 0's `svd` = (P, σ, Qᵀ) broadcast)."""
    p, sigma, qh = svd if svd is not None else torch.linalg.svd(core)
    q = qh.T  # V's coordinates are the right singular vectors: Q = Vhᵀ, not Vh
    left, right = p[:, :rank], q[:, :rank]
    return Truncated(u_aug @ left, torch.diag(sigma[:rank]), v_aug @ right, left[:r], right[:r], sigma,
                     rank if wanted is None else wanted)
