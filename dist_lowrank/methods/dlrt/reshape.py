"""DLRT's change of shape in the shared vocabulary: a capacity that grows (Embed, zeros) or shrinks (Slice).

Every column past the active rank is zero in K, L, S, U, V and in their moments, so both keep the function and
the state of the active block exactly; the bias is kept. Parameters keep their names, groups and steps."""
from __future__ import annotations

from torch import nn

from dist_lowrank.methods.dlrt.layer import DLRTLinear
from dist_lowrank.reshape.builders import like
from dist_lowrank.reshape.change import Embed, Keep, LayerChange, ParamChange, ShapeChange, Slice

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
