"""The `lowrank.tensor` section: the tensor format of the targeted layers, the Bayesian rank prior and pruning."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from dist_lowrank.config_io import Range, ge, gt
from dist_lowrank.config_io import help_field as _help


@dataclass
class TensorConfig:
    """Hawkins, Liu & Zhang: every targeted Linear / Embedding becomes a CP, Tucker, TT or TT-matrix layer whose
    rank slices carry scales λ_k (prior N(0, λ_k) on the slice's entries); λ follows the EM update every step, the
    prior's term joins the loss on a schedule, and slices whose λ falls below the threshold are removed."""

    format: Literal["cp", "tucker", "tt", "ttm"] = _help(
        "cp (one factor per mode, one rank), tucker (a factor per mode and a core), tt (tensor train over the row "
        "and column modes), ttm (tensor-train matrix: one core per (row mode, column mode) pair)", default="ttm")
    layer_formats: list[str] = _help("per-layer formats, each 'name suffix=format' (e.g. mlp.c_fc=tt); the first "
                                     "match wins, other layers take `format`", default_factory=list)
    init_rank: int = _help("starting rank of every rank slot (CP rank, Tucker ranks, TT bonds), clipped to what the "
                           "modes allow (>= 1)", check=ge(1), default=16)
    n_modes: int = _help("modes per dimension when row_modes / col_modes are not given: each dimension is "
                         "factored into this many near-equal factors (>= 1)", check=ge(1), default=2)
    row_modes: Optional[list[int]] = _help("factors of the output dimension (Linear) / the number of rows "
                                           "(Embedding); their product must equal it (null: automatic)",
                                           default=None)
    col_modes: Optional[list[int]] = _help("factors of the input dimension (Linear) / the embedding dimension; "
                                           "their product must equal it (null: automatic)", default=None)
    prior: Literal["log_uniform", "half_cauchy"] = _help(
        "hyperprior on each λ_k: log-uniform (EM: λ = M/(D+1)) or half-Cauchy(eta) (closed form)",
        default="log_uniform")
    eta: float = _help("half-Cauchy scale (> 0)", check=gt(0), default=1.0)
    em_stepsize: float = _help("damping of the EM update: λ ← (1 − s)·λ + s·λ_EM, in (0, 1]",
                               check=Range(0, 1, lo_open=True), default=1.0)
    kl_mult: float = _help("weight of the prior's term in the loss once ramped up (>= 0)", check=ge(0),
                           default=1e-4)
    no_kl_steps: int = _help("optimizer steps without the prior's term (>= 0)", check=ge(0), default=0)
    warmup: int = _help("optimizer steps over which the prior's weight then ramps linearly to kl_mult (>= 0)",
                        check=ge(0), default=0)
    threshold: float = _help("a rank slot whose λ falls below this is pruned (> 0)", check=gt(0), default=1e-4)
    prune_every: int = _help("optimizer steps between prune decisions (>= 1)", check=ge(1), default=50)
    prune_after: int = _help("no pruning before this optimizer step (>= 0)", check=ge(0), default=0)
    min_rank: int = _help("a rank slot never goes below this many slices (>= 1)", check=ge(1), default=1)
