"""Replace modules in place from a plan {layer name → rank}, and count what it saved."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from dist_lowrank.layers import LowRankConv2d, LowRankLinear, build_factorized, matrix_dims
from dist_lowrank.layers.shapes import is_hf_conv1d


@dataclass
class LayerChange:
    name: str
    shape: tuple[int, int]  # (m, n) of the weight matrix
    rank: int
    params_before: int
    params_after: int


@dataclass
class SurgeryReport:
    params_before: int
    params_after: int
    layers: list[LayerChange] = field(default_factory=list)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, shared parameters once (ZeRO-3 partitioned params at full size)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


# Prefixes wrappers insert into module names: activation checkpointing (torch's checkpoint_wrapper, the
# torchtitan pattern), FSDP1 and torch.compile. A model built by model_fn has none of them.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """`name` as the unwrapped model spells it (`h.0._checkpoint_wrapped_module.attn` → `h.0.attn`)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name[:-1] if name.endswith(".") else name


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap the child module at dotted `name`; returns the old one."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        raise ValueError(f"{name}: no such module") from None
    if not name or child not in parent._modules:
        raise ValueError(f"{name}: no such module")
    old = parent._modules[child]
    setattr(parent, child, new)
    return old


def _factorize(dense: nn.Module, rank: int) -> nn.Module:
    """Spectral init from the module's own weight (truncated SVD), or the layer's own `fold(rank)` (a method's
    layer that is a sum of parts, e.g. InRank's W0 + U Vᵀ)."""
    if isinstance(dense, nn.Conv2d):
        return LowRankConv2d.from_dense(dense, rank)
    if isinstance(dense, nn.Linear) or is_hf_conv1d(dense):
        return LowRankLinear.from_dense(dense, rank)
    if callable(getattr(dense, "fold", None)):
        return dense.fold(rank)
    raise TypeError(f"cannot factorize {type(dense).__name__}")


def apply_rank_plan(model: nn.Module, ranks: dict[str, int],
                    factors: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None) -> SurgeryReport:
    """Factorize each named layer at its rank: from precomputed factors (A m×r, B r×n) when given (no SVD
    here: a backend computes them once and broadcasts them), else from the layer's weight.

    Every entry is checked before any module is replaced, so a bad plan leaves the model untouched.
    Layers are processed (and reported) in sorted name order, the plan order used everywhere.
    """
    modules = dict(model.named_modules())
    for name in sorted(ranks):
        if not name or name not in modules:
            raise ValueError(f"{name}: not a module of this model")
        try:
            m, n = matrix_dims(modules[name])
        except TypeError as exc:
            raise ValueError(f"{name}: {exc}") from None
        if isinstance(modules[name], nn.Conv2d) and modules[name].groups != 1:
            raise ValueError(f"{name}: groups={modules[name].groups} is not supported (only groups=1)")
        rank = ranks[name]
        if isinstance(rank, bool) or int(rank) != rank or not 1 <= rank <= min(m, n):
            raise ValueError(f"{name}: rank {rank} outside 1..{min(m, n)} for a {m}x{n} weight")
        if factors is not None and name in factors:
            a, b = factors[name]
            if tuple(a.shape) != (m, rank) or tuple(b.shape) != (rank, n):
                raise ValueError(f"{name}: factors {tuple(a.shape)} @ {tuple(b.shape)} do not match rank {rank} "
                                 f"of a {m}x{n} weight")
    before = count_parameters(model)
    changes = []
    for name in sorted(ranks):
        dense, rank = modules[name], int(ranks[name])
        layer_before = count_parameters(dense)
        if factors is not None and name in factors:
            new = build_factorized(dense, *factors[name])
        else:
            new = _factorize(dense, rank)
        replace_module(model, name, new)
        changes.append(LayerChange(name, matrix_dims(dense), rank, layer_before, count_parameters(new)))
    return SurgeryReport(before, count_parameters(model), changes)
