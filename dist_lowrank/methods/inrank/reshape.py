"""InRank's changes of shape in the shared vocabulary: capacity growth (U, V embedded) and the fold (W0 + U Vᵀ
factorized by its truncated SVD into a LowRankLinear)."""
from __future__ import annotations

from torch import nn

from dist_lowrank.methods.inrank.layer import InRankLinear, _random_v
from dist_lowrank.reshape.builders import factorize_layer, like
from dist_lowrank.reshape.change import Embed, Gather, Keep, LayerChange, ParamChange, ShapeChange


def _grown_like(old: InRankLinear, width: int, capacity: int) -> InRankLinear:
    return InRankLinear(old.in_features, old.out_features, width, capacity, old.w0_mode, old.bias is not None,
                        seed=old.seed, **like(old))


def growth_layer(name: str, layer: InRankLinear, width: int, capacity: int) -> LayerChange:
    """U, V at a larger capacity: the old block kept, new U columns zero (the function is unchanged), new V
    columns seeded random (seed + capacity, as InRankLinear.with_capacity); moments embedded with zeros; W0 and the
    bias untouched. U, V keep their names, groups and steps."""
    n, seed = layer.in_features, layer.seed + capacity
    params = {"u": ParamChange(Embed("u", (layer.out_features, capacity))),
              "v": ParamChange(Embed("v", (n, capacity), fill=lambda shape: _random_v(shape[0], shape[1], seed)))}
    if layer.w0 is not None:
        params["w0"] = ParamChange(Keep())
    if layer.bias is not None:
        params["bias"] = ParamChange(Keep())
    return LayerChange(name, lambda old: _grown_like(old, width, capacity), params)


def growth_change(modules, widths: dict[str, int], capacities: dict[str, int], step: int) -> ShapeChange:
    """Every layer in `capacities` grows to that capacity, trained width `widths[name]` (`modules`: the model or
    its named modules)."""
    modules = dict(modules.named_modules()) if isinstance(modules, nn.Module) else modules
    return ShapeChange("grow", step, [growth_layer(n, modules[n], widths[n], c) for n, c in capacities.items()])


def effective_matrix(layer: InRankLinear, gather: Gather):
    """W0 + U[:, :r] V[:, :r]ᵀ, gathered (what the fold factorizes)."""
    r = layer.rank
    weight = gather(layer.u)[:, :r] @ gather(layer.v)[:, :r].T
    return weight if layer.w0 is None else weight + gather(layer.w0)


def fold_change(modules: dict[str, nn.Module], ranks: dict[str, int], step: int, lr_scale: float = 1.0) -> ShapeChange:
    """Efficient InRank's fold: each layer becomes a LowRankLinear at its rank (fresh factor state, like a switch)."""
    layers = [factorize_layer(n, modules[n], r, "zero", matrix=effective_matrix) for n, r in ranks.items()]
    return ShapeChange("switch", step, layers, lr_scale=lr_scale)
