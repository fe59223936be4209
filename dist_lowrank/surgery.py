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
    shape: tuple[int, int]
    rank: int
    params_before: int
    params_after: int


@dataclass
class SurgeryReport:
    params_before: int
    params_after: int
    layers: list[LayerChange] = field(default_factory=list)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (ZeRO-3 partitioned params counted at their full size)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at dotted `name`; returns the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise ValueError(f"{name}: no such module")
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def apply_rank_plan(model: nn.Module, ranks: dict[str, int],
                    factors: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None) -> SurgeryReport:
    """Factorize each named layer at its rank (precomputed factors if given, else truncated SVD)."""
    modules = dict(model.named_modules())
    before = count_parameters(model)
    changes = []
    for name in sorted(ranks):
        if name not in modules:
            raise ValueError(f"{name}: not a module of this model")
        dense = modules[name]
        m, n = matrix_dims(dense)
        rank = ranks[name]
        if not 1 <= rank <= min(m, n):
            raise ValueError(f"{name}: rank {rank} outside 1..{min(m, n)} for a {m}x{n} weight")
        layer_before = count_parameters(dense)
        if factors is not None and name in factors:
            new = build_factorized(dense, *factors[name])
        elif isinstance(dense, nn.Conv2d):
            new = LowRankConv2d.from_dense(dense, rank)
        elif isinstance(dense, nn.Linear) or is_hf_conv1d(dense):
            new = LowRankLinear.from_dense(dense, rank)
        else:
            raise TypeError(f"{name}: cannot factorize {type(dense).__name__}")
        replace_module(model, name, new)
        changes.append(LayerChange(name, (m, n), rank, layer_before, count_parameters(new)))
    return SurgeryReport(before, count_parameters(model), changes)
