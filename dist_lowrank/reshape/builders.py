"""Shape changes every method shares: factorize dense layers (switch), change a factorized layer's rank.

Method-specific changes (InRank's capacity growth, a tensor core's pruning) are built in the method's
folder with the same vocabulary (`reshape.change`).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from dist_lowrank.layers import LowRankConv2d, LowRankLinear, empty_factorized, is_hf_conv1d
from dist_lowrank.reshape.change import Factor, Gather, Keep, LayerChange, ParamChange, ShapeChange, Slice, Copy


def like(module: nn.Module) -> dict:
    """The dtype of a module's parameters, read without touching values (shards, meta). No device: builders run
    under `torch.device("meta")` (the pipeline's context) and the engine allocates where its parameters live."""
    return {"dtype": next(module.parameters()).dtype}


def dense_matrix(layer: nn.Module, gather: Gather) -> torch.Tensor:
    """The m×n matrix of a Linear / Conv2d / HF Conv1D weight, gathered (HF Conv1D stores Wᵀ)."""
    weight = gather(layer.weight).detach()
    return weight.T if is_hf_conv1d(layer) else weight.reshape(weight.shape[0], -1)


def factorize_layer(name: str, layer: nn.Module, rank: int, moments: Literal["zero", "projected"] = "zero",
                    matrix=dense_matrix) -> LayerChange:
    """`layer` (Linear, Conv2d, HF Conv1D, or anything `matrix` reads as m×n) → its factorized form at `rank`:
    first = B (r×n), second = A (m×r), bias copied. New factors join a companion group; their state is fresh
    (zero moments) or the weight's moments projected (then the bias's state is carried too)."""
    state = "project" if moments == "projected" else "fresh"
    params = {"first.weight": ParamChange(Factor("b"), state, "companion"),
              "second.weight": ParamChange(Factor("a"), state, "companion")}
    if getattr(layer, "bias", None) is not None:
        params["second.bias"] = ParamChange(Copy("bias"), "same" if moments == "projected" else "fresh", "companion")
    return LayerChange(name, lambda old: empty_factorized(old, rank, **like(old)), params, rank=rank, matrix=matrix)


def _modules(model_or_modules) -> dict[str, nn.Module]:
    return dict(model_or_modules.named_modules()) if isinstance(model_or_modules, nn.Module) else model_or_modules


def switch_change(modules, ranks: dict[str, int], step: int,
                  moments: Literal["zero", "projected"] = "zero", lr_scale: float = 1.0) -> ShapeChange:
    """Factorize every layer in `ranks` (name → rank) by its truncated SVD. `modules`: the model or its
    named modules."""
    modules = _modules(modules)
    layers = [factorize_layer(name, modules[name], rank, moments) for name, rank in ranks.items()]
    return ShapeChange("switch", step, layers, lr_scale=lr_scale)


def factorized_with_rank(old: nn.Module, rank: int) -> nn.Module:
    """An empty LowRankLinear / LowRankConv2d like `old` at another rank (no values read)."""
    kw = like(old)
    if isinstance(old, LowRankConv2d):
        f, s = old.first, old.second
        with torch.device("meta"):
            template = nn.Conv2d(f.in_channels, s.out_channels, f.kernel_size, f.stride, f.padding, f.dilation,
                                 bias=s.bias is not None, padding_mode=f.padding_mode)
        return LowRankConv2d(template, rank, **kw)
    if isinstance(old, LowRankLinear):
        return LowRankLinear(old.in_features, old.out_features, rank, bias=old.second.bias is not None, **kw)
    raise TypeError(f"{type(old).__name__} is not a factorized layer (LowRankLinear, LowRankConv2d)")


def rank_change_layer(name: str, layer: nn.Module, kept: tuple[int, ...]) -> LayerChange:
    """A factorized layer keeps the rank components `kept` (indices into its current rank, in order): rows of
    `first`, columns of `second`; values and optimizer state sliced alike, groups and steps kept."""
    params = {"first.weight": ParamChange(Slice("first.weight", (tuple(kept),))),
              "second.weight": ParamChange(Slice("second.weight", (None, tuple(kept))))}
    if layer.second.bias is not None:
        params["second.bias"] = ParamChange(Keep())
    return LayerChange(name, lambda old: factorized_with_rank(old, len(kept)), params)


def shrink_change(modules, ranks: dict[str, int], step: int) -> ShapeChange:
    """Every factorized layer in `ranks` keeps its leading `ranks[name]` components (a rank going down)."""
    modules = _modules(modules)
    layers = []
    for name, rank in ranks.items():
        current = modules[name].rank
        if not 1 <= rank <= current:
            raise ValueError(f"{name}: shrink to rank {rank}; allowed 1..{current}")
        layers.append(rank_change_layer(name, modules[name], tuple(range(rank))))
    return ShapeChange("shrink", step, layers)
