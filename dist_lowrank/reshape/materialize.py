"""A layer's new module made real on an engine's device: allocated, `Keep` parameters put back as the very old
objects (a ZeRO-3 partition stays partitioned, with its optimizer state), every other parameter written from the
pipeline's full values. Engine-neutral torch module work, shared by the engines that swap modules in place."""
from __future__ import annotations

import torch
from torch import nn

from dist_lowrank.reshape.change import Keep, LayerChange


def materialize(layer: LayerChange, new: nn.Module, old: nn.Module, device: torch.device,
                values: dict[str, torch.Tensor]) -> nn.Module:
    """`new` (built on the meta device) allocated on `device`, Keep parameters taken from `old`, values written."""
    new.to_empty(device=device)
    old_params = dict(old.named_parameters())
    with torch.no_grad():
        for leaf, change in layer.params.items():
            owner, _, attr = leaf.rpartition(".")
            parent = new.get_submodule(owner) if owner else new
            if isinstance(change.value, Keep):
                setattr(parent, attr, old_params[leaf])
            else:
                target = getattr(parent, attr)
                target.copy_(values[f"{layer.name}.{leaf}"].reshape(target.shape).to(device=device, dtype=target.dtype))
    return new
