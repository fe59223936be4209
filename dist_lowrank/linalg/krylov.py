"""σ_max of many matrices at once, from matrix-vector products only (operator form).

The caller supplies `apply_a` / `apply_at` for *all* layers together; each is called exactly `steps`
times, so a distributed caller issues one collective per call (the local products on shards are
summed). Golub–Kahan–Lanczos with full reorthogonalization reaches <1% srank error in ~20 steps on
random weights, where plain power iteration needs far more (DESIGN.md §3).

Every rank must get bit-identical answers from identical inputs, so the start vector comes from a
fixed-seed generator (never the global RNG) and layers that finish early keep receiving zero vectors:
the call sequence, and therefore the collective sequence, never depends on the data.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

Vectors = list[torch.Tensor]
Operator = Callable[[Vectors], Vectors]
Device = Union[torch.device, str, None]

METHODS = ("lanczos", "power")
_SEED = 12345
# Breakdown: a new direction whose norm is below TOL_FACTOR·eps·(largest norm seen) adds nothing to
# σ_max that this precision can resolve (relative, so the test is scale-invariant).
TOL_FACTOR = 1000.0


def start_vector(n: int, dtype: torch.dtype = torch.float64, device: Device = None) -> torch.Tensor:
    """The same unit n-vector on every process: normal entries from a fixed-seed CPU generator."""
    gen = torch.Generator(device="cpu").manual_seed(_SEED + n)
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    return (v / v.norm()).to(dtype=dtype, device=device)


def sigma_max_batched(apply_a: Operator, apply_at: Operator, dims: list[tuple[int, int]], method: str = "lanczos",
                      steps: int = 20, dtype: torch.dtype = torch.float64, device: Device = None) -> list[float]:
    """Largest singular value of each operator A_i (m_i × n_i), in the order of `dims`.

    `apply_a([v_i]) -> [A_i v_i]` and `apply_at([u_i]) -> [A_iᵀ u_i]` are each called exactly `steps`
    times with one vector per layer (a zero vector once a layer has converged or broken down).
    Vectors live on `device` (default CPU) in `dtype`. An operator returning NaN/Inf gives NaN for that
    layer only; a zero operator gives 0.0.
    """
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}; allowed: {', '.join(METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: got {steps!r}; allowed: an int >= 1")
    dims = [(int(m), int(n)) for m, n in dims]
    if any(m < 1 or n < 1 for m, n in dims):
        raise ValueError(f"dims: got {dims}; allowed: (m, n) pairs with m, n >= 1")
    device = torch.device("cpu") if device is None else torch.device(device)
    layers = [_Layer(m, n, dtype, device) for m, n in dims]
    for _ in range(steps):
        outs = _vectors(apply_a([x.right_input() for x in layers]), [m for m, _ in dims], "apply_a", dtype, device)
        for layer, out in zip(layers, outs):
            layer.take_a(out, method)
        outs = _vectors(apply_at([x.left_input() for x in layers]), [n for _, n in dims], "apply_at", dtype, device)
        for layer, out in zip(layers, outs):
            layer.take_at(out, method)
    return [x.sigma(method) for x in layers]


def _vectors(outs: Vectors, sizes: list[int], name: str, dtype: torch.dtype, device: torch.device) -> Vectors:
    """Operator results as flat vectors in the working dtype/device; a wrong count or size is a caller bug."""
    outs = list(outs)
    if len(outs) != len(sizes):
        raise ValueError(f"{name}: returned {len(outs)} vectors for {len(sizes)} layers")
    flat = []
    for i, (out, size) in enumerate(zip(outs, sizes)):
        if out.numel() != size:
            raise ValueError(f"{name}: layer {i} returned {out.numel()} entries, expected {size}")
        flat.append(out.detach().reshape(-1).to(dtype=dtype, device=device))
    return flat


def _orthogonalize(x: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    """Classical Gram–Schmidt applied twice ("twice is enough"): orthogonal to working precision."""
    if basis:
        q = torch.stack(basis, dim=1)
        for _ in range(2):
            x = x - q @ (q.T @ x)
    return x


class _Layer:
    """One operator's Krylov state. Lanczos: A V_k = U_k B_k (B upper bidiagonal, α diagonal, β above).

    Power iteration keeps only v and σ ≈ sqrt(‖AᵀA v‖) (a lower bound of σ_max for unit v, at least
    the Rayleigh quotient ‖A v‖).
    """

    def __init__(self, m: int, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.m, self.n = m, n
        self.v = start_vector(n, dtype, device)
        self.u: Optional[torch.Tensor] = None
        self.u_basis: list[torch.Tensor] = []
        self.v_basis: list[torch.Tensor] = []
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.alive = True
        self.nonfinite = False
        self.scale = 0.0
        self.power_sigma = 0.0
        self.tol = TOL_FACTOR * torch.finfo(dtype).eps

    # What this layer feeds the shared operator calls: its vector, or zeros once it has stopped.
    def right_input(self) -> torch.Tensor:
        return self.v if self.alive else torch.zeros_like(self.v)

    def left_input(self) -> torch.Tensor:
        if self.alive and self.u is not None:
            return self.u
        return torch.zeros(self.m, dtype=self.v.dtype, device=self.v.device)

    def _stop(self, raw: torch.Tensor) -> bool:
        """Stop (for good) on non-finite operator output; NaN is then reported for this layer."""
        if not bool(torch.isfinite(raw).all()):
            self.alive, self.nonfinite = False, True
        return not self.alive

    def take_a(self, au: torch.Tensor, method: str) -> None:
        """u_j = A v_j orthogonalized against U (this removes β_{j−1} u_{j−1}); α_j = ‖u_j‖."""
        if not self.alive or self._stop(au):
            return
        if method == "power":
            self.u = au
            return
        if len(self.u_basis) >= self.m:  # U spans R^m: nothing new can appear
            self.alive = False
            return
        u = _orthogonalize(au, self.u_basis)
        alpha = float(u.norm())
        self.scale = max(self.scale, float(au.norm()), alpha)
        if alpha <= self.tol * self.scale:
            self.alive = False
            return
        self.u = u / alpha
        self.alphas.append(alpha)
        self.u_basis.append(self.u)
        self.v_basis.append(self.v)

    def take_at(self, atu: torch.Tensor, method: str) -> None:
        """v_{j+1} = Aᵀ u_j orthogonalized against V (this removes α_j v_j); β_j = ‖v_{j+1}‖."""
        if not self.alive or self._stop(atu):
            return
        if method == "power":
            norm = float(atu.norm())
            self.power_sigma = math.sqrt(norm)
            if norm == 0.0:
                self.alive = False
            else:
                self.v = atu / norm
            return
        if len(self.v_basis) >= self.n:  # V spans R^n
            self.alive = False
            return
        w = _orthogonalize(atu, self.v_basis)
        beta = float(w.norm())
        self.scale = max(self.scale, float(atu.norm()), beta)
        if beta <= self.tol * self.scale:
            self.alive = False
            return
        self.betas.append(beta)
        self.v = w / beta

    def sigma(self, method: str) -> float:
        if self.nonfinite:
            return math.nan
        if method == "power":
            return self.power_sigma
        k = len(self.alphas)
        if k == 0:
            return 0.0
        # U_kᵀ A V_{k+1} = [B_k, β_k e_k] (k × (k+1)) once β_k is known: uses the last apply_at call too.
        cols = k + 1 if len(self.betas) == k else k
        b = torch.zeros(k, cols, dtype=torch.float64)
        b[range(k), range(k)] = torch.tensor(self.alphas, dtype=torch.float64)
        if len(self.betas):
            idx = range(len(self.betas))
            b[list(idx), [j + 1 for j in idx]] = torch.tensor(self.betas, dtype=torch.float64)
        return float(torch.linalg.svdvals(b)[0])
