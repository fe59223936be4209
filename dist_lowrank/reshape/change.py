"""One description of a change of shape: what every method produces and every engine executes.

A method decides *what* changes (a Plan, agreed by all ranks); it then describes *how* each affected
layer's parameters and optimizer state come from the old ones, as a `ShapeChange`. The pipeline
(`reshape.pipeline`) executes that description the same way for every engine; a backend supplies only
its primitives (gather a parameter, read its optimizer state, rebuild the engine with new modules).

Vocabulary, for each parameter of a new module (by leaf name inside its layer):
- `Keep()`      the old parameter of the same leaf name, unchanged (value, optimizer state, group, step);
                engines keep the very object (ZeRO-3 partition) or copy their local shard.
- `Copy(src)`   a new parameter whose value is the old `src`'s (e.g. the dense bias becoming `second.bias`).
- `Slice(src, index)`  kept indices per dim (None = all): a rank or a tensor core going down.
- `Embed(src, shape, fill)`  the old tensor in the leading corner of a bigger one; the rest zeros, or what
                `fill(shape)` draws (deterministic: the same on every rank, e.g. InRank's seeded V columns).
- `Factor(side)` one factor of the layer's truncated SVD at `LayerChange.rank`: "a" = U√Σ (m×r),
                "b" = √ΣVᵀ (r×n), of the m×n matrix `LayerChange.matrix` reads (computed once, by an owner rank);
                or a part of that SVD: "u" = U, "v" = V, "sigma" = diag Σ, "us" = UΣ, "vs" = VΣ, each in the
                leading corner of a bigger parameter where the layer allocates more than the rank (zeros elsewhere).
- `Rotate(src, left, right)`  left @ old @ right on the (dim 0 × rest) view, small matrices identical on
                every rank (a basis change).
Optimizer state of each new parameter (`ParamChange.state`): "same" applies the value's op to every moment
(Embed fills moments with zeros, Rotate uses squared matrices for second moments), "fresh" starts from
nothing (zero moments), "project" (Factor only) projects the old weight's moments onto the factors.
Param group (`ParamChange.group`): "inherit" = the group and step of the old parameter of the same name;
"companion" = a new group beside the source layer's group, its lr × `ShapeChange.lr_scale`, step 0
(or the source's step when the state is projected).

A module with Python-side shape state (InRank's active rank within its capacity) names it in a class attribute
`RESHAPE_ATTRS`; an engine that rebuilds modules from a skeleton copies those attributes from the old module of
the same name (`carry_attrs`), so a change of one layer never resets another.

This module is pure description and pure tensor math (`value_of`, `state_of`): no torch.distributed, no
engine, no method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import nn

from dist_lowrank.linalg.moments import SQUARED_KEYS, project_state

Gather = Callable[[torch.Tensor], torch.Tensor]  # a (possibly sharded) parameter -> its full tensor; collective


@dataclass(frozen=True)
class Keep:
    """The old parameter of the same leaf name, untouched."""


@dataclass(frozen=True)
class Copy:
    source: str


@dataclass(frozen=True)
class Slice:
    source: str
    index: tuple[Optional[tuple[int, ...]], ...]  # per dim: the kept indices, in order; None = the whole dim


@dataclass(frozen=True)
class Embed:
    source: str
    shape: tuple[int, ...]
    fill: Optional[Callable[[tuple[int, ...]], torch.Tensor]] = None  # None = zeros; else the full-shape draw


@dataclass(frozen=True)
class Factor:
    side: Literal["a", "b", "u", "v", "sigma", "us", "vs"]


@dataclass(frozen=True)
class Rotate:
    source: str
    left: Optional[torch.Tensor] = None   # (m' × m), applied on the left of the (m × rest) view
    right: Optional[torch.Tensor] = None  # (rest × rest'), applied on the right


Op = Union[Keep, Copy, Slice, Embed, Factor, Rotate]


@dataclass(frozen=True)
class ParamChange:
    value: Op
    state: Literal["same", "fresh", "project"] = "same"
    group: Literal["inherit", "companion"] = "inherit"


@dataclass
class LayerChange:
    """One layer (a module name) replaced by `build(old_module)`: a module of the new shapes whose values the
    pipeline then writes. `build` is called under `torch.device("meta")` (it must not pass a device, nor read
    the old module's tensors: they may be shards or meta); the engine allocates the new parameters where its
    own live and puts the old objects in for `Keep` ones. `params` covers every parameter of the new
    module by leaf name. `rank` and `matrix(old_module, gather)` serve the Factor ops: the m×n matrix that is
    factorized (collective through `gather`)."""

    name: str
    build: Callable[[nn.Module], nn.Module]
    params: dict[str, ParamChange]
    rank: Optional[int] = None
    matrix: Optional[Callable[[nn.Module, Gather], torch.Tensor]] = None

    def sources(self) -> set[str]:
        """Leaf names of the old module that some new parameter reads."""
        return {op.source for op in (p.value for p in self.params.values()) if hasattr(op, "source")}


@dataclass
class ShapeChange:
    """Every layer that changes at one step, in a fixed order (sorted by name: the same on every rank)."""

    kind: str
    step: int
    layers: list[LayerChange]
    lr_scale: float = 1.0
    attrs: dict[str, Any] = field(default_factory=dict)  # what the method wants logged with the change

    def __post_init__(self) -> None:
        self.layers = sorted(self.layers, key=lambda layer: layer.name)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def needs_factors(self) -> bool:
        return any(isinstance(p.value, Factor) for layer in self.layers for p in layer.params.values())


def carry_attrs(old: nn.Module, new: nn.Module, skip: frozenset[str] | set[str] = frozenset()) -> None:
    """Copy the `RESHAPE_ATTRS` of every submodule of `old` to the same-named submodule of `new` (same type),
    except in the layers named in `skip` (they were just changed: their builders set them)."""
    olds = dict(old.named_modules())
    for name, module in new.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        source = olds.get(name)
        if source is not None and type(source) is type(module):
            for attr in getattr(module, "RESHAPE_ATTRS", ()):
                setattr(module, attr, getattr(source, attr))


# -- pure tensor math of the ops ----------------------------------------------------------------------

def value_of(op: Op, old: dict[str, torch.Tensor], factors: Optional[tuple[torch.Tensor, torch.Tensor]],
             shape: tuple[int, ...]) -> torch.Tensor:
    """The new full tensor of shape `shape` from the old layer's full tensors `old` (leaf name -> tensor) and,
    for Factor ops, the layer's factors (A, B)."""
    if isinstance(op, Factor):
        if factors is None:
            raise ValueError("Factor op without factors")
        part = factor_part(factors, op.side)
        return part.reshape(shape) if part.numel() == torch.Size(shape).numel() else embed_tensor(part, shape)
    if isinstance(op, Keep):
        raise ValueError("Keep has no new value: the engine keeps the old parameter")
    source = old[op.source]
    if isinstance(op, Copy):
        out = source
    elif isinstance(op, Slice):
        out = slice_tensor(source, op.index)
    elif isinstance(op, Embed):
        out = embed_tensor(source, op.shape, op.fill)
    elif isinstance(op, Rotate):
        out = rotate_tensor(source, op.left, op.right)
    else:
        raise TypeError(f"unknown op {op!r}")
    return out.reshape(shape)


def state_of(change: ParamChange, old_states: dict[str, Optional[dict]], shape: tuple[int, ...],
             projected: Optional[dict] = None) -> Optional[dict]:
    """The new parameter's full optimizer state, or None (fresh: the optimizer starts it). `old_states`: the
    old layer's full states by leaf name (None where a parameter has none yet); `projected`: this
    parameter's projected state (computed by the pipeline from the weight's moments and the factors)."""
    if change.state == "fresh" or isinstance(change.value, Keep):
        return None
    if change.state == "project":
        return projected
    op = change.value
    if isinstance(op, Factor):
        raise ValueError("a Factor's state is 'fresh' or 'project'")
    state = old_states.get(op.source)
    if not state:
        return None
    out: dict = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value  # Adam's step
        elif isinstance(op, Embed):
            out[key] = embed_tensor(value, op.shape).reshape(shape)
        elif isinstance(op, Rotate) and key in SQUARED_KEYS:
            square = lambda m: None if m is None else m * m  # noqa: E731 - diagonal approximation, non-negative
            out[key] = rotate_tensor(value, square(op.left), square(op.right)).reshape(shape)
        else:
            out[key] = value_of(op, {op.source: value}, None, shape)
    return out


def factor_part(factors: tuple[torch.Tensor, torch.Tensor], side: str) -> torch.Tensor:
    """A Factor op's tensor from the layer's (A, B) = (U√Σ, √ΣVᵀ): column i of A has norm √σᵢ, row i of B too, so
    UΣ = A·‖Bᵢ‖ and VΣ = Bᵀ·‖Aᵢ‖ need no division; U = A / ‖Aᵢ‖ is guarded (a zero singular value gives a zero
    column, which the next truncation drops)."""
    a, b = factors
    if side in ("a", "b"):
        return a if side == "a" else b
    compute = torch.promote_types(a.dtype, torch.float32)
    a32, b32 = a.to(compute), b.to(compute)
    root_a, root_b = a32.norm(dim=0), b32.norm(dim=1)
    tiny = torch.finfo(compute).tiny
    parts = {"u": lambda: a32 / root_a.clamp_min(tiny), "v": lambda: b32.T / root_b.clamp_min(tiny),
             "sigma": lambda: torch.diag(root_a * root_b), "us": lambda: a32 * root_b, "vs": lambda: b32.T * root_a}
    if side not in parts:
        raise ValueError(f"Factor side {side!r}: allowed a, b, u, v, sigma, us, vs")
    return parts[side]().to(a.dtype)


def slice_tensor(tensor: torch.Tensor, index: tuple[Optional[tuple[int, ...]], ...]) -> torch.Tensor:
    out = tensor
    for dim, kept in enumerate(index):
        if kept is not None:
            out = out.index_select(dim, torch.tensor(kept, dtype=torch.long, device=out.device))
    return out.contiguous()


def embed_tensor(tensor: torch.Tensor, shape: tuple[int, ...],
                 fill: Optional[Callable[[tuple[int, ...]], torch.Tensor]] = None) -> torch.Tensor:
    if len(shape) != tensor.dim() or any(s < t for s, t in zip(shape, tensor.shape)):
        raise ValueError(f"embed: {tuple(tensor.shape)} does not fit into {tuple(shape)}")
    if fill is not None:
        out = fill(tuple(shape)).to(dtype=tensor.dtype, device=tensor.device).clone()
    else:
        out = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    out[tuple(slice(0, s) for s in tensor.shape)] = tensor
    return out


def rotate_tensor(tensor: torch.Tensor, left: Optional[torch.Tensor], right: Optional[torch.Tensor]) -> torch.Tensor:
    matrix = tensor.reshape(tensor.shape[0], -1)
    compute = torch.promote_types(tensor.dtype, torch.float32)
    out = matrix.to(compute)
    if left is not None:
        out = left.to(out.device, compute) @ out
    if right is not None:
        out = out @ right.to(out.device, compute)
    return out.to(tensor.dtype)


def project_factor_states(weight_state: dict, a: torch.Tensor, b: torch.Tensor) -> tuple[dict, dict]:
    """(A's state, B's state) from the dense weight's state in its m×n orientation (linalg.moments)."""
    return project_state(weight_state, a, b)
