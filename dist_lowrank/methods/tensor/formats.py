"""A matrix (rows × cols) stored in a tensor format: the pure math of tensorized layers (Hawkins, Liu & Zhang).

The matrix is factored as row modes r_1..r_d (product = rows) × col modes c_1..c_e (product = cols); its tensor
view is the order-(d+e) tensor W.reshape(*row_modes, *col_modes) (row-major). For a Linear rows = out_features
and cols = in_features (the weight is out × in, as nn.Linear's); for an Embedding rows = num_embeddings and
cols = embedding_dim. Formats and their cores, n = d + e:
- cp:     factors A_k (m_k, R), k = 1..n;               W[i_1..i_n] = Σ_R Π_k A_k[i_k, R]
- tucker: factors U_k (m_k, R_k), then the core G (R_1..R_n) LAST;  W = G ×_1 U_1 ... ×_n U_n
- tt:     cores (b_{k-1}, m_k, b_k), b_0 = b_n = 1;      W[i_1..i_n] = G_1[:, i_1, :] ... G_n[:, i_n, :]
- ttm:    cores (b_{k-1}, r_k, c_k, b_k), k = 1..d, d = e, b_0 = b_d = 1 (one core per (row mode, col mode) pair)

Rank groups (`rank_groups`) are the vectors of rank scales λ of the Bayesian model: a slot k of a group governs
the slices `core.select(dim, k)` listed in the group; its `prior` slices carry the N(0, λ_k) prior (what the EM
update sums over) and its `prune` slices are removed with it (what keeps the pruned cores equal to the masked ones).

Everything is plain torch (einsum, matmul, reshape): no tensorly, no opt_einsum. torch.einsum without opt_einsum
contracts its operands left to right, so every contraction here is a chain of two-operand steps written in the
order they should run.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

FORMATS = ("cp", "tucker", "tt", "ttm")
PATHS = ("dense", "direct")
Index = tuple[Optional[tuple[int, ...]], ...]  # per dim: kept indices, or None = the whole dim (reshape.change.Slice)


def _prod(values: Sequence[int]) -> int:
    return math.prod(int(v) for v in values)


@dataclass(frozen=True)
class TensorSpec:
    """The format, the modes and the ranks of one tensorized matrix (everything but the values)."""

    format: str                     # one of FORMATS
    row_modes: tuple[int, ...]
    col_modes: tuple[int, ...]
    ranks: tuple[int, ...]          # cp: (R,); tucker: one per mode; tt: the d+e-1 bonds; ttm: the d-1 bonds

    def __post_init__(self) -> None:
        # JSON (a checkpoint's layout) gives lists: normalise so that equal specs compare and hash equal
        for name in ("row_modes", "col_modes", "ranks"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.format not in FORMATS:
            raise ValueError(f"TensorSpec: unknown format {self.format!r}; expected one of {', '.join(FORMATS)}")
        if not self.row_modes or not self.col_modes or min(self.modes) < 1:
            raise ValueError(f"TensorSpec: modes must be non-empty and >= 1 (row_modes {self.row_modes}, "
                             f"col_modes {self.col_modes})")
        if self.format == "ttm" and len(self.row_modes) != len(self.col_modes):
            raise ValueError(f"TensorSpec: ttm pairs row and col modes, got {len(self.row_modes)} row modes "
                             f"{self.row_modes} and {len(self.col_modes)} col modes {self.col_modes}")
        expected = _n_rank_slots(self.format, len(self.row_modes), len(self.col_modes))
        if len(self.ranks) != expected or (self.ranks and min(self.ranks) < 1):
            raise ValueError(f"TensorSpec: {self.format} with {len(self.row_modes)}+{len(self.col_modes)} modes "
                             f"needs {expected} ranks >= 1, got {self.ranks}")

    @property
    def rows(self) -> int:
        return _prod(self.row_modes)

    @property
    def cols(self) -> int:
        return _prod(self.col_modes)

    @property
    def modes(self) -> tuple[int, ...]:
        return self.row_modes + self.col_modes

    @property
    def order(self) -> int:
        return len(self.modes)


def _n_rank_slots(fmt: str, d: int, e: int) -> int:
    return {"cp": 1, "tucker": d + e, "tt": d + e - 1, "ttm": d - 1}[fmt]


# -- building a spec ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def auto_modes(dim: int, n: int) -> tuple[int, ...]:
    """`n` factors of `dim`, as balanced as possible (non-increasing): 784 → (28, 28), 512 → (8, 8, 8), a prime
    → (dim, 1, ...). Balanced = the descending tuple that is lexicographically smallest (smallest largest factor,
    then smallest second, ...): the largest factor bounds the cores' sizes."""
    if dim < 1 or n < 1:
        raise ValueError(f"auto_modes: need dim >= 1 and n >= 1, got dim={dim}, n={n}")
    if n == 1:
        return (dim,)
    root = int(dim ** (1.0 / n) * (1 - 1e-9))   # the largest factor is at least the n-th root (a safe floor)
    for f in _divisors(dim):
        if f < root:
            continue
        rest = auto_modes(dim // f, n - 1)      # the smallest completion; if it does not fit under f, none does
        if rest[0] <= f:
            return (f, *rest)
    raise AssertionError("unreachable: f = dim always completes with ones")


def _divisors(dim: int) -> list[int]:
    small = [f for f in range(1, math.isqrt(dim) + 1) if dim % f == 0]
    return sorted(set(small + [dim // f for f in small]))


def default_mode_counts(fmt: str, rows: int, cols: int) -> tuple[int, int]:
    """Modes per side when neither modes nor n_modes are given: 2 per dimension (the paper's and the reference's
    most common split: each factor about √dim, cores small and the chain short), 1 for a dimension < 4 (a split of
    2 or 3 is (2, 1) or (3, 1): a mode of 1 adds a core and saves nothing). ttm pairs modes, so both sides take the
    smaller count."""
    d, e = (1 if rows < 4 else 2), (1 if cols < 4 else 2)
    return (min(d, e),) * 2 if fmt == "ttm" else (d, e)


def make_spec(format: str, rows: int, cols: int, rank: Union[int, Sequence[int]],
              row_modes: Optional[Sequence[int]] = None, col_modes: Optional[Sequence[int]] = None,
              n_modes: Optional[int] = None) -> TensorSpec:
    """A validated spec for a rows × cols matrix. `rank` (an int for every slot, or one value per slot) is clipped
    to what the modes can use (Tucker R_k ≤ m_k; a TT / TT-matrix bond ≤ the size of either side it separates):
    a larger rank only adds parameters that represent nothing new. Modes not given: `auto_modes` with `n_modes`
    factors per side (default `default_mode_counts`)."""
    if format not in FORMATS:
        raise ValueError(f"make_spec: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if rows < 1 or cols < 1:
        raise ValueError(f"make_spec: need rows >= 1 and cols >= 1, got rows = {rows}, cols = {cols}")
    n_rows, n_cols = _mode_counts(format, rows, cols, row_modes, col_modes, n_modes)
    rmodes = _checked_modes("row_modes", "rows", rows, row_modes, n_rows)
    cmodes = _checked_modes("col_modes", "cols", cols, col_modes, n_cols)
    if format == "ttm" and len(rmodes) != len(cmodes):
        raise ValueError(f"make_spec: ttm needs as many row modes as col modes, got row_modes {rmodes} and "
                         f"col_modes {cmodes}")
    return TensorSpec(format, rmodes, cmodes, _clipped_ranks(format, rmodes, cmodes, rank))


def _mode_counts(fmt: str, rows: int, cols: int, row_modes: Optional[Sequence[int]],
                 col_modes: Optional[Sequence[int]], n_modes: Optional[int]) -> tuple[int, int]:
    if n_modes is not None:
        if n_modes < 1:
            raise ValueError(f"make_spec: n_modes must be >= 1, got {n_modes}")
        d = e = int(n_modes)
    else:
        d, e = default_mode_counts(fmt, rows, cols)
    if fmt == "ttm":  # one side given: the other side follows its count
        if row_modes is not None:
            e = len(row_modes) if col_modes is None else e
        if col_modes is not None:
            d = len(col_modes) if row_modes is None else d
    return d, e


def _checked_modes(key: str, dim_name: str, dim: int, modes: Optional[Sequence[int]], n: int) -> tuple[int, ...]:
    if modes is None:
        return auto_modes(dim, n)
    modes = tuple(int(m) for m in modes)
    if not modes or min(modes) < 1:
        raise ValueError(f"make_spec: {key} {modes} must be non-empty and >= 1 ({dim_name} = {dim})")
    if _prod(modes) != dim:
        raise ValueError(f"make_spec: {key} {modes} multiply to {_prod(modes)}, but {dim_name} = {dim}")
    return modes


def _clipped_ranks(fmt: str, row_modes: tuple[int, ...], col_modes: tuple[int, ...],
                   rank: Union[int, Sequence[int]]) -> tuple[int, ...]:
    caps = rank_caps(fmt, row_modes, col_modes)
    wanted = [int(rank)] * len(caps) if isinstance(rank, int) else [int(r) for r in rank]
    if len(wanted) != len(caps):
        raise ValueError(f"make_spec: {fmt} needs {len(caps)} ranks, got {tuple(wanted)}")
    if wanted and min(wanted) < 1:
        raise ValueError(f"make_spec: ranks must be >= 1, got {tuple(wanted)}")
    return tuple(min(w, c) for w, c in zip(wanted, caps))


def rank_caps(fmt: str, row_modes: tuple[int, ...], col_modes: tuple[int, ...]) -> tuple[int, ...]:
    """The largest useful value of every rank slot. CP has no such bound (a CP rank may exceed every mode), so its
    cap is unbounded (2⁶³ − 1)."""
    modes = tuple(row_modes) + tuple(col_modes)
    if fmt == "cp":
        return (2 ** 63 - 1,)
    if fmt == "tucker":
        return modes
    sides = modes if fmt == "tt" else tuple(r * c for r, c in zip(row_modes, col_modes))
    return tuple(min(_prod(sides[:k]), _prod(sides[k:])) for k in range(1, len(sides)))


# -- cores and rank groups -------------------------------------------------------------------------------------

def core_shapes(spec: TensorSpec) -> list[tuple[int, ...]]:
    """The shape of every core, in parameter order (see the module docstring)."""
    if spec.format == "cp":
        return [(m, spec.ranks[0]) for m in spec.modes]
    if spec.format == "tucker":
        return [(m, r) for m, r in zip(spec.modes, spec.ranks)] + [tuple(spec.ranks)]
    bonds = (1, *spec.ranks, 1)
    if spec.format == "tt":
        return [(bonds[k], m, bonds[k + 1]) for k, m in enumerate(spec.modes)]
    return [(bonds[k], r, c, bonds[k + 1]) for k, (r, c) in enumerate(zip(spec.row_modes, spec.col_modes))]


def n_params(spec: TensorSpec) -> int:
    return sum(_prod(s) for s in core_shapes(spec))


@dataclass(frozen=True)
class RankGroup:
    """One vector of rank scales λ (`size` slots). (core index, dim) pairs: slot k's `prior` slices
    core.select(dim, k) have prior variance λ_k; its `prune` slices are removed when slot k goes."""

    size: int
    prior: tuple[tuple[int, int], ...]
    prune: tuple[tuple[int, int], ...]


def rank_groups(spec: TensorSpec) -> list[RankGroup]:
    """The rank groups of a spec, in the order of `spec.ranks`.

    TT / TT-matrix bond k (between cores k and k+1) puts its prior on core k's last dim only; the last core has no
    bond of its own, so the last bond also covers the last core's first dim (as the reference code does). Pruning a
    bond removes both sides of it."""
    if spec.format == "cp":
        slices = tuple((i, 1) for i in range(spec.order))
        return [RankGroup(spec.ranks[0], slices, slices)]
    if spec.format == "tucker":
        core = spec.order
        return [RankGroup(r, ((k, 1),), ((k, 1), (core, k))) for k, r in enumerate(spec.ranks)]
    last = 2 if spec.format == "tt" else 3
    n_bonds = len(spec.ranks)
    groups = []
    for k, size in enumerate(spec.ranks):
        prior = ((k, last), (k + 1, 0)) if k == n_bonds - 1 else ((k, last),)
        groups.append(RankGroup(size, prior, ((k, last), (k + 1, 0))))
    return groups


def slice_counts(spec: TensorSpec) -> list[int]:
    """Per group, D = the number of entries in ONE slot's prior slices (the same for every slot)."""
    shapes = core_shapes(spec)
    return [sum(_prod(shapes[i]) // shapes[i][dim] for i, dim in g.prior) for g in rank_groups(spec)]


def slice_sums(spec: TensorSpec, cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per group, M_k = Σ of the squared entries of slot k's prior slices (a vector of the group's size), in at
    least fp32; differentiable (the prior's term of the loss is built from it)."""
    out = []
    for group in rank_groups(spec):
        total = None
        for i, dim in group.prior:
            sq = _compute(cores[i]).pow(2)
            part = sq.sum(dim=[j for j in range(sq.dim()) if j != dim])
            total = part if total is None else total + part
        out.append(total)
    return out


def flat_slice_sums(shape: Sequence[int], dim: int, flat_offset: int, local_flat: torch.Tensor,
                    size: int) -> torch.Tensor:
    """Σ of squares per index along `dim` of the entries of a tensor of `shape` held as a piece: `local_flat` are
    the entries at row-major flat positions flat_offset, flat_offset+1, ... (a ZeRO-3 flat partition, an FSDP row
    shard). Summing the results over disjoint pieces that cover the tensor gives the whole tensor's slice sums.

    No index tensor (which would cost 8 bytes per entry): positions along `dim` come in runs of `inner` = Π
    shape[dim+1:] entries, cycling with period `size`; zero-padding the piece to whole runs, then the run sums to
    whole periods, turns both into reshapes and sums."""
    shape = tuple(int(s) for s in shape)
    dim = dim % len(shape)
    if size != shape[dim]:
        raise ValueError(f"flat_slice_sums: size {size} != shape[{dim}] = {shape[dim]} of {shape}")
    local = local_flat.reshape(-1)
    if flat_offset < 0 or flat_offset + local.numel() > _prod(shape):
        raise ValueError(f"flat_slice_sums: range [{flat_offset}, {flat_offset + local.numel()}) outside "
                         f"{_prod(shape)} entries of {shape}")
    if local.numel() == 0:
        return torch.zeros(size, dtype=_compute(local).dtype, device=local.device)
    inner = _prod(shape[dim + 1:])
    runs = _fold(_compute(local).pow(2), flat_offset % inner, inner).sum(dim=1)  # one sum per run
    return _fold(runs, (flat_offset // inner) % size, size).sum(dim=0)


def _fold(values: torch.Tensor, lead: int, width: int) -> torch.Tensor:
    """`values` (1-D) placed `lead` entries into rows of `width`, zero-padded: (n_rows, width)."""
    tail = -(lead + values.numel()) % width
    return F.pad(values, (lead, tail)).reshape(-1, width)


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def pruned(spec: TensorSpec, keep: Sequence[Sequence[int]]) -> tuple[TensorSpec, list[Index]]:
    """The spec with, per rank group, only the slots in `keep` (sorted, at least one each), and per core the index
    to slice it with (per dim: kept indices, or None = the whole dim, as reshape.change.Slice). A group that keeps
    every slot slices nothing, so a core no removed slot touches gets an all-None index."""
    groups = rank_groups(spec)
    if len(keep) != len(groups):
        raise ValueError(f"pruned: {spec.format} has {len(groups)} rank groups, got {len(keep)} keep lists")
    kept = [tuple(int(i) for i in k) for k in keep]
    shapes = core_shapes(spec)
    index = [[None] * len(s) for s in shapes]
    for g, (group, k) in enumerate(zip(groups, kept)):
        if not k or list(k) != sorted(set(k)) or k[0] < 0 or k[-1] >= group.size:
            raise ValueError(f"pruned: group {g} (size {group.size}) needs sorted distinct slots in "
                             f"0..{group.size - 1}, at least one; got {k}")
        if k == tuple(range(group.size)):
            continue
        for i, dim in group.prune:
            index[i][dim] = k
    new = TensorSpec(spec.format, spec.row_modes, spec.col_modes, tuple(len(k) for k in kept))
    return new, [tuple(idx) for idx in index]


# -- contractions --------------------------------------------------------------------------------------------------

def _mode_product(t: torch.Tensor, u: torch.Tensor, dim: int) -> torch.Tensor:
    """t with its dim `dim` (size u.shape[1]) contracted with u's columns, replaced by u's rows (size u.shape[0])."""
    letters = string.ascii_letters
    subs = letters[:t.dim()]
    new = letters[t.dim()]
    return torch.einsum(f"{subs},{new}{subs[dim]}->{subs.replace(subs[dim], new)}", t, u)


def _khatri_rao(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(Π m_k, R): row (i_1..i_k) row-major = Π_k A_k[i_k, :] (the CP factors' columnwise Kronecker product)."""
    out = factors[0]
    for f in factors[1:]:
        out = torch.einsum("ar,br->abr", out, f).reshape(-1, f.shape[1])
    return out


def _chain(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """A train of cores (b, *, b') contracted over its bonds: (b_first · Π middles, b_last), row-major."""
    out = cores[0].reshape(-1, cores[0].shape[-1])
    for core in cores[1:]:
        out = (out @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
    return out


def reconstruct(spec: TensorSpec, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The rows × cols matrix the cores represent."""
    d = len(spec.row_modes)
    if spec.format == "cp":
        return _khatri_rao(cores[:d]) @ _khatri_rao(cores[d:spec.order]).T
    if spec.format == "tucker":
        t = cores[-1]
        for k in range(spec.order):
            t = _mode_product(t, cores[k], k)
        return t.reshape(spec.rows, spec.cols)
    if spec.format == "tt":
        return _chain(cores).reshape(spec.rows, spec.cols)
    paired = _chain([c.reshape(c.shape[0], -1, c.shape[-1]) for c in cores])  # (r_1 c_1 r_2 c_2 ..., 1)
    t = paired.reshape([m for rc in zip(spec.row_modes, spec.col_modes) for m in rc])
    return t.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2)).reshape(spec.rows, spec.cols)


def _direct_cp(spec: TensorSpec, cores: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    # x times the col factors' Khatri-Rao product (cols × R) is x contracted with every col factor, the R index
    # kept diagonal, in one GEMM; the row factors' Khatri-Rao product (rows × R) expands the R scores
    d = len(spec.row_modes)
    return (x @ _khatri_rao(cores[d:spec.order])) @ _khatri_rao(cores[:d]).T


def _direct_tucker(spec: TensorSpec, cores: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    d, batch = len(spec.row_modes), x.shape[0]
    t = x.reshape(batch, *spec.col_modes)
    for j in range(len(spec.col_modes)):                 # c_j → R_{d+j}
        t = _mode_product(t, cores[d + j].T, 1 + j)
    core = cores[-1]
    t = t.reshape(batch, -1) @ core.reshape(_prod(spec.ranks[:d]), -1).T
    t = t.reshape(batch, *spec.ranks[:d])
    for k in range(d):                                   # R_k → r_k
        t = _mode_product(t, cores[k], 1 + k)
    return t.reshape(batch, spec.rows)


def _direct_tt(spec: TensorSpec, cores: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    # from the last core inward: (B·c_1..c_{j-1}, c_j·b') @ (c_j·b', b) leaves the bond b towards the row part
    d, batch = len(spec.row_modes), x.shape[0]
    t = x.reshape(-1, 1)
    for core in reversed(cores[d:]):
        t = t.reshape(-1, core.shape[1] * core.shape[2]) @ core.reshape(core.shape[0], -1).T
    z = t.reshape(batch, cores[d].shape[0])               # (B, b_d)
    return z @ _chain(cores[:d]).T                       # row part: (rows, b_d)


def _direct_ttm(spec: TensorSpec, cores: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    # t (B, rows done, b, c_k, cols to do) with core (b, r_k, c_k, b') → (B, rows done · r_k, b', cols to do)
    batch = x.shape[0]
    t = x.reshape(batch, 1, 1, spec.col_modes[0], -1)
    for k, core in enumerate(cores):
        t = torch.einsum("zpbcq,brcs->zprsq", t, core)
        nxt = spec.col_modes[k + 1] if k + 1 < len(cores) else 1
        t = t.reshape(batch, -1, core.shape[-1], nxt, t.shape[-1] // nxt)
    return t.reshape(batch, spec.rows)


_DIRECT = {"cp": _direct_cp, "tucker": _direct_tucker, "tt": _direct_tt, "ttm": _direct_ttm}


def apply(spec: TensorSpec, cores: Sequence[torch.Tensor], x: torch.Tensor, path: Optional[str] = None
          ) -> torch.Tensor:
    """y = x @ Wᵀ for x (..., cols) → (..., rows). path "dense" builds W and runs one GEMM; "direct" contracts x
    with the cores without building W; None picks the one with fewer multiply-adds for this batch (`flops`)."""
    if x.shape[-1] != spec.cols:
        raise ValueError(f"apply: x has {x.shape[-1]} features, the matrix has cols = {spec.cols}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, spec.cols)
    path = choose_path(spec, x2.shape[0]) if path is None else path
    if path == "dense":
        y = F.linear(x2, reconstruct(spec, cores))
    elif path == "direct":
        y = _DIRECT[spec.format](spec, cores, x2)
    else:
        raise ValueError(f"apply: path {path!r}; expected one of {', '.join(PATHS)} or None")
    return y.reshape(*lead, spec.rows)


def lookup(spec: TensorSpec, cores: Sequence[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """reconstruct(spec, cores)[index] → (*index.shape, cols) without building the table: each index splits into
    its row-mode digits (row-major), the row cores are gathered at those digits and contracted with the col part
    (batch-independent, built once). An index outside 0..rows-1 fails in the first gather (as nn.Embedding's)."""
    flat = index.reshape(-1).long()
    digits = _digits(flat, spec.row_modes)
    d, n = len(spec.row_modes), flat.numel()
    if spec.format == "cp":
        z = cores[0].index_select(0, digits[0])
        for k in range(1, d):
            z = z * cores[k].index_select(0, digits[k])
        out = z @ _khatri_rao(cores[d:spec.order]).T
    elif spec.format == "tucker":
        col_part = cores[-1]
        for j in range(len(spec.col_modes)):
            col_part = _mode_product(col_part, cores[d + j], d + j)
        z = cores[0].index_select(0, digits[0])
        for k in range(1, d):
            z = torch.einsum("np,nq->npq", z, cores[k].index_select(0, digits[k])).reshape(n, -1)
        out = z @ col_part.reshape(z.shape[1], spec.cols)
    elif spec.format == "tt":
        z = cores[0][0].index_select(0, digits[0])                       # (N, b_1)
        for k in range(1, d):
            z = torch.einsum("nb,bnc->nc", z, cores[k].index_select(1, digits[k]))
        out = z @ _chain(cores[d:]).reshape(z.shape[1], spec.cols)
    else:
        z = cores[0].new_ones((n, 1, 1))             # (N, cols done, b)
        for k, core in enumerate(cores):
            z = torch.einsum("npb,bncs->npcs", z, core.index_select(1, digits[k])).reshape(n, -1, core.shape[-1])
        out = z.reshape(n, spec.cols)
    return out.reshape(*index.shape, spec.cols)


def _digits(flat: torch.Tensor, modes: tuple[int, ...]) -> list[torch.Tensor]:
    """Row-major digits of `flat` in `modes`; the first is not reduced, so an out-of-range index stays out of range."""
    strides = [_prod(modes[k + 1:]) for k in range(len(modes))]
    return [flat // strides[0]] + [(flat // s) % m for s, m in zip(strides[1:], modes[1:])]


# -- cost and initialisation ------------------------------------------------------------------------------------

def flops(spec: TensorSpec, batch: int) -> dict[str, int]:
    """Multiply-adds of `apply` on `batch` rows, for each path, counted step by step as the code runs them
    (reshapes, permutes and copies are not counted; a product A (p×q) @ B (q×s) counts p·q·s).

    "dense" = building W (`reconstruct`) + batch·rows·cols. "direct" = the contraction of x with the cores,
    including the batch-independent parts it builds (CP's Khatri-Rao products, TT's row part)."""
    return {"dense": _build_cost(spec) + batch * spec.rows * spec.cols, "direct": _direct_cost(spec, batch)}


def choose_path(spec: TensorSpec, batch: int) -> str:
    """The cheaper path by `flops`; a tie goes to "dense" (one GEMM, the best-tuned kernel)."""
    cost = flops(spec, batch)
    return "direct" if cost["direct"] < cost["dense"] else "dense"


def _kr_cost(modes: Sequence[int], rank: int) -> int:
    return sum(_prod(modes[:k + 1]) * rank for k in range(1, len(modes)))


def _chain_cost(shapes: Sequence[tuple[int, ...]]) -> int:
    """`_chain`: (P, b) @ (b, middle·b') per core after the first."""
    total, p = 0, _prod(shapes[0][:-1])
    for s in shapes[1:]:
        total += p * _prod(s)
        p *= _prod(s[1:-1])
    return total


def _mode_products_cost(shape: Sequence[int], steps: Sequence[tuple[int, int]]) -> int:
    """Successive mode products on a tensor of `shape`: (dim, new size) each; a step costs numel · new size."""
    shape, total = list(shape), 0
    for dim, size in steps:
        total += _prod(shape) * size
        shape[dim] = size
    return total


def _build_cost(spec: TensorSpec) -> int:
    shapes = core_shapes(spec)
    if spec.format == "cp":
        r = spec.ranks[0]
        return _kr_cost(spec.row_modes, r) + _kr_cost(spec.col_modes, r) + spec.rows * spec.cols * r
    if spec.format == "tucker":
        return _mode_products_cost(spec.ranks, list(enumerate(spec.modes)))
    if spec.format == "tt":
        return _chain_cost(shapes)
    return _chain_cost([(s[0], s[1] * s[2], s[3]) for s in shapes])


def _direct_cost(spec: TensorSpec, batch: int) -> int:
    d, shapes = len(spec.row_modes), core_shapes(spec)
    if spec.format == "cp":
        r = spec.ranks[0]
        return (_kr_cost(spec.row_modes, r) + _kr_cost(spec.col_modes, r)
                + batch * spec.cols * r + batch * r * spec.rows)
    if spec.format == "tucker":
        e = len(spec.col_modes)
        cols = _mode_products_cost((batch, *spec.col_modes), [(1 + j, spec.ranks[d + j]) for j in range(e)])
        core = batch * _prod(spec.ranks)
        rows = _mode_products_cost((batch, *spec.ranks[:d]), [(1 + k, spec.row_modes[k]) for k in range(d)])
        return cols + core + rows
    if spec.format == "tt":
        total, p = 0, batch * spec.cols
        for s in reversed(shapes[d:]):              # (B·c_<j, c_j·b') @ (c_j·b', b)
            total += p * s[2] * s[0]
            p //= s[1]
        return total + _chain_cost(shapes[:d]) + batch * spec.rows * shapes[d][0]
    total, done, todo = 0, 1, spec.cols
    for (b, r, c, b2) in shapes:                   # (B, done, b, c, todo) x (b, r, c, b')
        todo //= c
        total += batch * done * b * c * r * b2 * todo
        done *= r
    return total


def init_std(spec: TensorSpec, target_var: float) -> float:
    """The std s of i.i.d. N(0, s²) core entries for which every entry of the matrix has variance `target_var`.
    An entry is a sum of n_terms products of n_cores independent zero-mean entries (uncorrelated terms), so
    var = n_terms · s^(2·n_cores): cp R terms of d+e factors; tucker Π R_k terms of d+e+1; tt / ttm Π bonds terms
    of one entry per core (d+e for tt, d for ttm)."""
    if target_var <= 0:
        raise ValueError(f"init_std: target variance must be > 0, got {target_var}")
    if spec.format == "cp":
        terms, factors = spec.ranks[0], spec.order
    elif spec.format == "tucker":
        terms, factors = _prod(spec.ranks), spec.order + 1
    else:
        terms, factors = _prod(spec.ranks), len(core_shapes(spec))
    return float((target_var / terms) ** (1.0 / (2 * factors)))
