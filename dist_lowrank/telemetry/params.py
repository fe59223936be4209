"""Parameter counts that say what they count: all elements (frozen ones too) and trainable ones.

InRank keeps a frozen W0 beside its trainable factors: its total grows while what the optimizer and
the gradient collectives carry shrinks, so the two are reported apart. ZeRO-3 partitions report their
full size (`ds_numel`); a parameter shared by two modules counts once (`parameters()` dedups).
"""
from __future__ import annotations

from torch import nn


def _numel(param: nn.Parameter) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"params": every element, "trainable": elements with requires_grad, "frozen": the rest}."""
    total = trainable = 0
    for param in model.parameters():
        total += _numel(param)
        trainable += _numel(param) if param.requires_grad else 0
    return {"params": total, "trainable": trainable, "frozen": total - trainable}


def param_shapes(model: nn.Module, trainable: bool) -> list[tuple[int, ...]]:
    """Full shapes (ZeRO-3: `ds_shape`) of the trainable or of the frozen parameters."""
    return [tuple(getattr(p, "ds_shape", p.shape)) for p in model.parameters() if p.requires_grad == trainable]
