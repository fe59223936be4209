"""DLRT's changes of shape in the shared vocabulary: a capacity that grows (Embed, zeros) or shrinks (Slice), and
the switch of a dense warm-up (start=switch) into DLRT layers.

Every column past the active rank is zero in K, L, S, U, V and in their moments, so a resize keeps the function
and the state of the active block exactly; the bias is kept. Parameters keep their names, groups and steps. The
switch writes U, V, S = diag σ, K = UΣ, L = VΣ of each dense weight's truncated SVD (Factor parts, computed once by
an owner rank) with fresh moments in a companion group, like Cuttlefish's factors (the bias value is kept)."""
from __future__ import annotations

from torch import nn

from dist_lowrank.methods.dlrt.layer import DLRTLinear
from dist_lowrank.methods.dlrt.model import empty_dlrt_like
from dist_lowrank.reshape.builders import dense_matrix, like
from dist_lowrank.reshape.change import Copy, Embed, Factor, Keep, LayerChange, ParamChange, ShapeChange, Slice

FACTORS = {"u": "rows", "v": "rows", "k": "rows", "l": "rows", "s": "square"}


def capacity_layer(name: str, layer: DLRTLinear, rank: int, capacity: int) -> LayerChange:
    """`layer` at `capacity` (≥ rank): each factor's leading block kept, the rest zeros (grow) or cut (shrink)."""
    m, n, old = layer.out_features, layer.in_features, layer.capacity
    keep = tuple(range(capacity))
    params = {}
    for leaf, form in FACTORS.items():
        rows = {"u": m, "k": m, "v": n, "l": n, "s": capacity}[leaf]
        if capacity >= old:
            params[leaf] = ParamChange(Embed(leaf, (rows, capacity)))
        else:
            params[leaf] = ParamChange(Slice(leaf, (keep if form == "square" else None, keep)))
    if layer.bias is not None:
        params["bias"] = ParamChange(Keep())
    return LayerChange(name, lambda module: module.resized(rank, capacity, **like(module)), params)


def capacity_change(modules, ranks: dict[str, int], capacities: dict[str, int], step: int) -> ShapeChange:
    """Every layer in `capacities` resized to it, at rank `ranks[name]` (`modules`: the model or its modules)."""
    modules = dict(modules.named_modules()) if isinstance(modules, nn.Module) else modules
    layers = [capacity_layer(n, modules[n], ranks[n], c) for n, c in capacities.items()]
    return ShapeChange("resize", step, layers)


SVD_PARTS = {"u": "u", "v": "v", "s": "sigma", "k": "us", "l": "vs"}


def switch_layer(name: str, dense: nn.Module, rank: int, capacity: int) -> LayerChange:
    """A dense Linear / HF Conv1D / Conv2d → a DLRT layer at `rank` within `capacity`, from its truncated SVD."""
    params = {leaf: ParamChange(Factor(part), "fresh", "companion") for leaf, part in SVD_PARTS.items()}
    if getattr(dense, "bias", None) is not None:
        params["bias"] = ParamChange(Copy("bias"), "fresh", "companion")
    return LayerChange(name, lambda module: empty_dlrt_like(module, rank, capacity, **like(module)), params,
                       rank=rank, matrix=dense_matrix)


def switch_change(modules, ranks: dict[str, int], capacities: dict[str, int], step: int) -> ShapeChange:
    modules = dict(modules.named_modules()) if isinstance(modules, nn.Module) else modules
    return ShapeChange("switch", step, [switch_layer(n, modules[n], r, capacities[n]) for n, r in ranks.items()])
