"""The Bayesian rank model, as math on small vectors: the EM update of each rank slot's scale λ_k, the schedule of
the prior's weight in the loss, and the prior's term itself.

Every slice k of a rank group has entries ~ N(0, λ_k); with M_k = the slice's sum of squares and D its number of
entries, the M-step for λ_k under the hyperprior is
- log-uniform (p(λ) ∝ 1/λ): λ = M / (D + 1);
- half-Cauchy(η): λ = (M − η²D + √(M² + (2D + 8)η²M + η⁴D²)) / (2D + 4).
MAP training (the reference's setting) adds −log p(slices | λ) up to constants, ½ Σ_k M_k / λ_k, to the loss with
the weight `kl_weight(step)`: a per-slice weight decay of strength w/λ_k that drives unneeded slices (and their λ)
towards zero, where the threshold prunes them.
"""
from __future__ import annotations

import torch

from dist_lowrank.methods.tensor.config import TensorConfig


def em_scales(sums: torch.Tensor, count: int, prior: str, eta: float) -> torch.Tensor:
    """λ from the M-step for slices with squared sums `sums` (a vector) and `count` entries each (fp64 math)."""
    m = sums.double()
    d = float(count)
    if prior == "log_uniform":
        return m / (d + 1.0)
    if prior == "half_cauchy":
        e2 = eta * eta
        return (m - e2 * d + torch.sqrt(m * m + (2 * d + 8) * e2 * m + e2 * e2 * d * d)) / (2 * d + 4)
    raise ValueError(f"lowrank.tensor.prior: {prior!r}; allowed: log_uniform, half_cauchy")


def damped(old: torch.Tensor, new: torch.Tensor, stepsize: float) -> torch.Tensor:
    """The damped EM step (stepsize 1: the plain update)."""
    return new if stepsize >= 1.0 else (1.0 - stepsize) * old + stepsize * new


def kl_weight(step: int, cfg: TensorConfig) -> float:
    """The prior's weight after optimizer step `step`: 0 for `no_kl_steps` steps, then a linear ramp over `warmup`
    steps to `kl_mult`."""
    if step <= cfg.no_kl_steps or cfg.kl_mult == 0:
        return 0.0
    if cfg.warmup == 0:
        return cfg.kl_mult
    return cfg.kl_mult * min(1.0, (step - cfg.no_kl_steps) / cfg.warmup)


def slice_weights(scales: list[torch.Tensor], weight: float) -> list[torch.Tensor]:
    """Per group, the factor w / (2 λ_k) that multiplies a slice's sum of squares in the loss (fp32)."""
    return [(weight / (2.0 * lam.clamp_min(torch.finfo(torch.float64).tiny))).float() for lam in scales]


def penalty(cores: list[torch.Tensor], prior_slices: list[tuple[tuple[int, int], ...]],
            weights: list[torch.Tensor]) -> torch.Tensor:
    """Σ over groups g, their prior slices (core c, dim d) and slots k of weights_g[k] · ‖core_c.select(d, k)‖²:
    the prior's term of the loss, differentiable in the cores (computed inside the forward, where sharding engines
    hold the whole cores)."""
    total = cores[0].new_zeros((), dtype=torch.float32)
    for slices, w in zip(prior_slices, weights):
        for c, d in slices:
            core = cores[c]
            other = [i for i in range(core.dim()) if i != d]
            sums = core.float().pow(2).sum(dim=other) if other else core.float().pow(2)
            total = total + (sums * w.to(sums.device)).sum()
    return total

