"""σ_max of many matrices at once, from matrix-vector products only (operator form).

The caller supplies `apply_a` / `apply_at` for *all* layers together; each is called at most `steps`
times, so a distributed caller issues one collective per call (the local products on shards are
summed). Golub–Kahan–Lanczos with full reorthogonalization reaches <1% srank error in ~20 steps on
random weights, where plain power iteration needs far more (DESIGN.md §3).

Every rank must get bit-identical answers from identical inputs, so the start vector comes from a
generator seeded by `seed` (never the global RNG) and layers that finish early keep receiving zero vectors.
The loop ends early only when every layer has converged (σ_max moved less than `rtol` relative in the
last step) and the optional `agree(settled)` hook says stop: a distributed caller answers with a decision
all ranks share (the monitor's lags one step: the votes ride on the next step's all-reduce), so the call
sequence is the same on every rank even if their data differed.
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
# Convergence is not tested before this many steps: the first Lanczos estimates can stall briefly.
MIN_STEPS_BEFORE_STOP = 4


def start_vector(n: int, dtype: torch.dtype = torch.float64, device: Device = None, seed: int = 0) -> torch.Tensor:
    """The same unit n-vector on every process: normal entries from a CPU generator seeded by `seed`
    (the plugin's `lowrank.seed`) and n; never the global RNG."""
    gen = torch.Generator(device="cpu").manual_seed(_SEED + n + 1_000_003 * int(seed))
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    return (v / v.norm()).to(dtype=dtype, device=device)


def sigma_max_batched(apply_a: Operator, apply_at: Operator, dims: list[tuple[int, int]], method: str = "lanczos",
                      steps: int = 20, dtype: torch.dtype = torch.float64, device: Device = None,
                      rtol: float = 0.0, agree: Optional[Callable[[bool], bool]] = None,
                      seed: int = 0) -> list[float]:
    """Largest singular value of each operator A_i (m_i × n_i), in the order of `dims`.

    `apply_a([v_i]) -> [A_i v_i]` and `apply_at([u_i]) -> [A_iᵀ u_i]` are called once per step with one
    vector per layer (a zero vector once a layer has converged or broken down): exactly `steps` times
    when `rtol` is 0, fewer when every layer's estimate has settled to `rtol` (relative change in one
    step) and `agree(True)` returns True. Vectors live on `device` (default CPU) in `dtype`. An
    operator returning NaN/Inf gives NaN for that layer only; a zero operator gives 0.0.
    """
    _check_options(method, steps, rtol)
    dims = [(int(m), int(n)) for m, n in dims]
    if any(m < 1 or n < 1 for m, n in dims):
        raise ValueError(f"dims: got {dims}; allowed: (m, n) pairs with m, n >= 1")
    device = torch.device("cpu") if device is None else torch.device(device)
    layers = [_Layer(m, n, steps, dtype, device, seed) for m, n in dims]
    for step in range(steps):
        outs = _vectors(apply_a([x.right_input() for x in layers]), [m for m, _ in dims], "apply_a", dtype, device)
        for layer, out in zip(layers, outs):
            layer.take_a(out, method)
        outs = _vectors(apply_at([x.left_input() for x in layers]), [n for _, n in dims], "apply_at", dtype, device)
        for layer, out in zip(layers, outs):
            layer.take_at(out, method)
        if rtol > 0.0 and step + 1 >= MIN_STEPS_BEFORE_STOP and step + 1 < steps:
            settled = all(x.settled(method, rtol) for x in layers)
            if (agree(settled) if agree is not None else settled):
                break
    return [x.sigma(method) for x in layers]


def _check_options(method: str, steps: int, rtol: float) -> None:
    """One line naming the bad argument (the monitor passes these straight from the config)."""
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}; allowed: {', '.join(METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: got {steps!r}; allowed: an int >= 1")
    if not (isinstance(rtol, (int, float)) and 0.0 <= rtol < 1.0):
        raise ValueError(f"rtol: got {rtol!r}; allowed: a number in [0, 1)")


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


class _Basis:
    """Orthonormal vectors kept as rows of one preallocated matrix (no re-stacking every step)."""

    def __init__(self, capacity: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rows = torch.empty(capacity, dim, dtype=dtype, device=device)
        self.size = 0

    def full(self) -> bool:
        return self.size >= self.rows.shape[0]

    def add(self, x: torch.Tensor) -> None:
        self.rows[self.size] = x
        self.size += 1

    def orthogonalize(self, x: torch.Tensor) -> torch.Tensor:
        """Classical Gram–Schmidt applied twice ("twice is enough"): orthogonal to working precision."""
        if self.size:
            q = self.rows[: self.size]
            for _ in range(2):
                x = x - q.T @ (q @ x)
        return x


class _KrylovState:
    """What every layer's Krylov run keeps: the current right vector, α/β, liveness, scale, σ history."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> None:
        self.n = n
        self.v = start_vector(n, dtype, device, seed)
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.alive = True
        self.nonfinite = False
        self.scale = 0.0
        self.history: list[float] = []
        self.tol = TOL_FACTOR * torch.finfo(dtype).eps


class _Layer(_KrylovState):
    """One operator's Krylov state. Lanczos: A V_k = U_k B_k (B upper bidiagonal, α diagonal, β above).

    Power iteration keeps only v and σ ≈ sqrt(‖AᵀA v‖) (a lower bound of σ_max for unit v, at least
    the Rayleigh quotient ‖A v‖).
    """

    def __init__(self, m: int, n: int, steps: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> None:
        _KrylovState.__init__(self, n, dtype, device, seed)
        self.m = m
        self.u: Optional[torch.Tensor] = None
        self.u_basis = _Basis(min(steps, m), m, dtype, device)
        self.v_basis = _Basis(min(steps, n), n, dtype, device)
        self.power_sigma = 0.0

    # What this layer feeds the shared operator calls: its vector, or zeros once it has stopped.
    def right_input(self) -> torch.Tensor:
        return self.v if self.alive else torch.zeros_like(self.v)

    def left_input(self) -> torch.Tensor:
        if self.alive and self.u is not None:
            return self.u
        return torch.zeros(self.m, dtype=self.v.dtype, device=self.v.device)

    def _norm_or_stop(self, raw: torch.Tensor) -> Optional[float]:
        """‖raw‖, or None after stopping for good on non-finite output (NaN is then reported)."""
        norm = float(raw.norm())
        if not math.isfinite(norm):  # any NaN/Inf entry makes the norm NaN/Inf
            self.alive, self.nonfinite = False, True
            return None
        return norm

    def take_a(self, au: torch.Tensor, method: str) -> None:
        """u_j = A v_j orthogonalized against U (this removes β_{j−1} u_{j−1}); α_j = ‖u_j‖."""
        if not self.alive:
            return
        raw_norm = self._norm_or_stop(au)
        if raw_norm is None:
            return
        if method == "power":
            self.u = au
            return
        if self.u_basis.full():  # U spans R^m (or the step budget): nothing new can appear
            self.alive = False
            return
        u = self.u_basis.orthogonalize(au)
        alpha = float(u.norm())
        self.scale = max(self.scale, raw_norm, alpha)
        if alpha <= self.tol * self.scale:
            self.alive = False
            return
        self.u = u / alpha
        self.alphas.append(alpha)
        self.u_basis.add(self.u)
        self.v_basis.add(self.v)

    def take_at(self, atu: torch.Tensor, method: str) -> None:
        """v_{j+1} = Aᵀ u_j orthogonalized against V (this removes α_j v_j); β_j = ‖v_{j+1}‖."""
        if not self.alive:
            return
        raw_norm = self._norm_or_stop(atu)
        if raw_norm is None:
            return
        if method == "power":
            self.power_sigma = math.sqrt(raw_norm)
            if raw_norm == 0.0:
                self.alive = False
            else:
                self.v = atu / raw_norm
            return
        if self.v_basis.size >= self.n:  # V spans R^n
            self.alive = False
            return
        w = self.v_basis.orthogonalize(atu)
        beta = float(w.norm())
        self.scale = max(self.scale, raw_norm, beta)
        if beta <= self.tol * self.scale:
            self.alive = False
            return
        self.betas.append(beta)
        self.v = w / beta

    def settled(self, method: str, rtol: float) -> bool:
        """True once stopped, or when this step's σ estimate moved less than rtol from the last one."""
        if not self.alive:
            return True
        self.history.append(self.sigma(method))
        if len(self.history) < 2:
            return False
        last, before = self.history[-1], self.history[-2]
        return abs(last - before) <= rtol * abs(last)

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


def sigma_max_gram(apply_g: Operator, ns: list[int], method: str = "lanczos", steps: int = 20,
                   dtype: torch.dtype = torch.float64, device: Device = None, rtol: float = 0.0,
                   agree: Optional[Callable[[bool], bool]] = None, seed: int = 0) -> list[float]:
    """σ_max of each A_i from its Gram operator: `apply_g([v_i]) -> [A_iᵀ A_i v_i]` (n_i-vectors).

    Symmetric Lanczos (full reorthogonalization) on AᵀA spans the same Krylov space as `steps` steps
    of Golub–Kahan on A, but needs one product per step instead of two: when every rank holds whole
    rows of A, AᵀA v = Σ_ranks A_rᵀ(A_r v) is one all-reduce of an n-vector per step. Power iteration
    gives sqrt(‖AᵀA v‖), exactly what `sigma_max_batched` computes with two calls. Call count, `rtol`
    and `agree` as in `sigma_max_batched`.
    """
    _check_options(method, steps, rtol)
    ns = [int(n) for n in ns]
    if any(n < 1 for n in ns):
        raise ValueError(f"ns: got {ns}; allowed: sizes >= 1")
    device = torch.device("cpu") if device is None else torch.device(device)
    layers = [_GramLayer(n, steps, dtype, device, seed) for n in ns]
    for step in range(steps):
        outs = _vectors(apply_g([x.input() for x in layers]), ns, "apply_g", dtype, device)
        for layer, out in zip(layers, outs):
            layer.take(out, method)
        if rtol > 0.0 and step + 1 >= MIN_STEPS_BEFORE_STOP and step + 1 < steps:
            settled = _gram_settled(layers, method, rtol)
            if agree(settled) if agree is not None else settled:
                break
    return [x.sigma(method) for x in layers]


def _gram_settled(layers: list["_GramLayer"], method: str, rtol: float) -> bool:
    """Record every live layer's current σ (one batched eigvalsh: live layers share k); a layer whose σ
    moved less than rtol in this step stops (its later slots are zeros); report whether all have stopped."""
    live = [x for x in layers if x.alive]
    if not live:
        return True
    if method == "power":
        sigmas = [x.sigma(method) for x in live]
    else:
        k = len(live[0].alphas)
        sigmas = torch.linalg.eigvalsh(torch.stack([x.t[:k, :k] for x in live]))[:, -1].clamp(min=0).sqrt().tolist()
    done = True
    for x, sigma in zip(live, sigmas):
        x.history.append(sigma)
        if len(x.history) >= 2 and abs(x.history[-1] - x.history[-2]) <= rtol * abs(sigma):
            x.alive = False  # settled: no more Krylov work for this layer (same decision on every rank)
        else:
            done = False
    return done


class _GramLayer(_KrylovState):
    """Lanczos on G = AᵀA: G V_k = V_k T_k + β_k v_{k+1} e_kᵀ (T tridiagonal: α diagonal, β beside)."""

    def __init__(self, n: int, steps: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> None:
        _KrylovState.__init__(self, n, dtype, device, seed)
        self.basis = _Basis(min(steps, n), n, dtype, device)
        self.t = torch.zeros(steps, steps, dtype=torch.float64)  # T_k in its top-left k × k block
        self.power_lambda = 0.0

    def input(self) -> torch.Tensor:
        return self.v if self.alive else torch.zeros_like(self.v)

    def take(self, gv: torch.Tensor, method: str) -> None:
        """α_j = v_jᵀ G v_j; v_{j+1} = G v_j orthogonalized against V (v_j included); β_j = its norm."""
        if not self.alive:
            return
        raw_norm = float(gv.norm())
        if not math.isfinite(raw_norm):
            self.alive, self.nonfinite = False, True
            return
        if method == "power":
            self.power_lambda = raw_norm
            if raw_norm == 0.0:
                self.alive = False
            else:
                self.v = gv / raw_norm
            return
        k = len(self.alphas)
        self.alphas.append(float(self.v @ gv))
        self.t[k, k] = self.alphas[-1]
        if k:
            self.t[k, k - 1] = self.t[k - 1, k] = self.betas[k - 1]
        self.basis.add(self.v)
        if self.basis.size >= self.n:  # V spans R^n: T_k is G itself
            self.alive = False
            return
        w = self.basis.orthogonalize(gv)
        beta = float(w.norm())
        self.scale = max(self.scale, raw_norm)
        if beta <= self.tol * self.scale:
            self.alive = False
            return
        self.betas.append(beta)
        self.v = w / beta

    def sigma(self, method: str) -> float:
        if self.nonfinite:
            return math.nan
        if method == "power":
            return math.sqrt(self.power_lambda)
        k = len(self.alphas)
        if k == 0:
            return 0.0
        return math.sqrt(max(float(torch.linalg.eigvalsh(self.t[:k, :k])[-1]), 0.0))
