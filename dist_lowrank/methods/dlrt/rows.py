"""The integrator's basis step on row shards (FSDP2): no U, V, K or L is ever gathered.

Each rank holds a block of rows of U, K (m × r) and V, L (n × r). Everything the step needs from all rows is a
small product summed over the ranks — `reduce` is one all-reduce of many such products at once, every layer of
the model in the same call:
- Ũ = orth((I − U Uᵀ) K1): two projection passes (UᵀK1, then Uᵀ of the residual: r×r sums), then CholeskyQR2 —
  the Gram matrix RᵀR (r×r, summed, in fp64), its eigendecomposition (a rank-deficient residual keeps only the
  directions above GRAM_TOL of the largest; the rest are zero columns, whose core rows are zero, so the SVD and
  the truncation are unchanged), a Cholesky pass on the (summed) Gram of the result — and a last projection
  against U, as the gathered path does after its QR;
- the core's off-diagonal blocks L1ᵀṼ and ŨᵀK1 (r×q, p×r sums).
Shapes depend on r and the widths only, so every rank takes the same path; the reduced sums are the same bits on
every rank (an all-reduce's result is). Pure tensor math with an injected `reduce`: no torch.distributed here.
"""
from __future__ import annotations

from typing import Callable

import torch

Reduce = Callable[[list[torch.Tensor]], list[torch.Tensor]]  # each tensor summed over the ranks, one collective
GRAM_TOL = 1e-12  # eigenvalues of RᵀR below this fraction of the largest are numerical zeros (κ(R) > 1e6)


def new_directions(bases: list[torch.Tensor], updates: list[torch.Tensor], widths: list[int],
                   reduce: Reduce) -> list[torch.Tensor]:
    """For every layer, this rank's rows of `widths[i]` orthonormal columns spanning (I − B Bᵀ)·update (B: the
    orthonormal basis, rows as held here); columns past the residual's numerical rank are zeros."""
    rests = list(updates)
    for _ in range(2):  # the second pass makes the residual orthogonal to B to working precision
        rests = _project_out(bases, rests, reduce)
    # Orthonormalizing scales weak residual directions up, and their round-off against B with them: project again
    return _project_out(bases, orthonormal_columns(rests, widths, reduce), reduce)


def _project_out(bases: list[torch.Tensor], blocks: list[torch.Tensor], reduce: Reduce) -> list[torch.Tensor]:
    """blocks − B (Bᵀ blocks), Bᵀ blocks summed over the row shards."""
    coefficients = reduce([b.T @ x for b, x in zip(bases, blocks)])
    return [x - b @ c for b, x, c in zip(bases, blocks, coefficients)]


def orthonormal_columns(blocks: list[torch.Tensor], widths: list[int], reduce: Reduce) -> list[torch.Tensor]:
    """CholeskyQR2 with a rank-revealing first pass, in fp64, of row-sharded blocks (see the module docstring)."""
    wide = [b.to(torch.float64) for b in blocks]
    grams = reduce([b.T @ b for b in wide])
    firsts, kept = [], []
    for block, gram, width in zip(wide, grams, widths):
        values, vectors = torch.linalg.eigh(gram)
        values, vectors = values.flip(0), vectors.flip(1)  # descending
        top = float(values[0]) if len(values) else 0.0
        keep = min(width, int((values > GRAM_TOL * top).sum())) if top > 0 else 0
        firsts.append(block @ (vectors[:, :keep] / values[:keep].sqrt()))
        kept.append(keep)
    out = []
    for q, keep, width, block in zip(_cholesky_qr(firsts, reduce), kept, widths, blocks):
        padded = q.new_zeros(q.shape[0], width)
        padded[:, :keep] = q
        out.append(padded.to(block.dtype))
    return out


def _cholesky_qr(wide: list[torch.Tensor], reduce: Reduce) -> list[torch.Tensor]:
    """One Cholesky QR pass over row-sharded fp64 blocks: B = Q Lᵀ with BᵀB = L Lᵀ (the Gram summed over the
    blocks in one reduce); Q stays next to B. A block without columns stays as it is."""
    out = []
    for block, gram in zip(wide, reduce([b.T @ b for b in wide])):
        if block.shape[1]:
            lower = torch.linalg.cholesky(gram)
            block = torch.linalg.solve_triangular(lower, block.T, upper=False).T
        out.append(block)
    return out


def core_blocks(k1: list[torch.Tensor], l1: list[torch.Tensor], u_new: list[torch.Tensor],
                v_new: list[torch.Tensor], reduce: Reduce) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(L1ᵀṼ, ŨᵀK1) of every layer, summed over the row blocks in one reduce."""
    n = len(k1)
    sums = reduce([l.T @ v for l, v in zip(l1, v_new)] + [u.T @ k for u, k in zip(u_new, k1)])
    return sums[:n], sums[n:]


def reorthonormalize(blocks: list[torch.Tensor], reduce: Reduce) -> list[torch.Tensor]:
    """Row blocks of nearly orthonormal bases (stored in half precision) made orthonormal in fp64 by one Cholesky
    QR (B = Q Lᵀ with BᵀB = L Lᵀ, summed): Q stays next to B, as integrator.reorthonormalize's."""
    wide = [b.to(torch.float64) for b in blocks]
    return [q.to(original.dtype) for q, original in zip(_cholesky_qr(wide, reduce), blocks)]
