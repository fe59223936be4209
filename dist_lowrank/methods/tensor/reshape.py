"""A prune in the shared vocabulary: every core of a layer sliced along the rank dimensions whose slots go.

Removing slot k of a rank group removes every slice the group's slot governs (CP: column k of every factor;
Tucker: column k of U_n and the core's slice on mode n; TT / TT-matrix bond k: G_k[..., k] and G_{k+1}[k, ...]),
so the pruned cores contract to exactly what the cores with those slices zeroed did. Moments are sliced the same
way (`Slice` with state "same"), each parameter keeps its group and step; the bias is kept as it is."""
from __future__ import annotations

from torch import nn

from dist_lowrank.methods.tensor import formats
from dist_lowrank.reshape.builders import like
from dist_lowrank.reshape.change import Keep, LayerChange, ParamChange, ShapeChange, Slice


def prune_layer(name: str, layer: nn.Module, keep: list[list[int]]) -> LayerChange:
    """`layer` with, per rank group, only the slots in `keep` (sorted indices)."""
    spec, index = formats.pruned(layer.spec, [tuple(k) for k in keep])
    params = {f"core_{i}": ParamChange(Keep() if all(k is None for k in idx) else Slice(f"core_{i}", idx))
              for i, idx in enumerate(index)}  # a core no removed slot touches keeps its very parameter
    if getattr(layer, "bias", None) is not None:
        params["bias"] = ParamChange(Keep())
    return LayerChange(name, lambda module: module.pruned_like(spec, **like(module)), params)


def prune_change(layers: dict[str, nn.Module], keep: dict[str, list[list[int]]], step: int) -> ShapeChange:
    """Every layer in `keep` pruned to its kept slots (`layers`: name -> tensorized layer)."""
    return ShapeChange("prune", step, [prune_layer(n, layers[n], k) for n, k in keep.items()])
