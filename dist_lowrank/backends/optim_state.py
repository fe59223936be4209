"""Carry a torch optimizer's per-parameter state across a rebuild, by parameter name.

Untouched parameters keep every state tensor bit for bit (Adam: step, exp_avg, exp_avg_sq,
max_exp_avg_sq; SGD: momentum_buffer). New parameters (the factors) get no state: torch's Adam then
starts them at step 0 with zero moments, so its bias correction treats them as the fresh parameters
they are. (Old moments belong to another parameterization, W, and have no exact image in U and V.)
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def _clone(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def snapshot_state(optimizer: torch.optim.Optimizer, named_params: dict[str, nn.Parameter]) -> dict[str, dict]:
    """{name: copy of the optimizer state of that parameter} (params without state are left out)."""
    out = {}
    for name, param in named_params.items():
        state = optimizer.state.get(param)
        if state:
            out[name] = {k: _clone(v) for k, v in state.items()}
    return out


def transplant_state(optimizer: torch.optim.Optimizer, named_params: dict[str, nn.Parameter],
                     snapshot: dict[str, dict], new_names: Iterable[str] = ()) -> None:
    """Install snapshot entries into `optimizer` for the same-named params; shapes must match."""
    fresh = set(new_names)
    for name, state in snapshot.items():
        if name in fresh:
            continue
        if name not in named_params:
            raise KeyError(f"{name}: has optimizer state but no parameter in the rebuilt model")
        param = named_params[name]
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise ValueError(f"{name}: optimizer state {key} has shape {tuple(value.shape)}, "
                                 f"parameter has {tuple(param.shape)}")
        optimizer.state[param] = {k: _clone(v) for k, v in state.items()}


def embed_state(state: dict, new_shape: torch.Size) -> dict:
    """A grown parameter's state: old moments in the leading block, zeros in the new rows/columns
    (they have no history); scalars such as `step` are kept, so the old block's bias correction holds."""
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            grown = torch.zeros(new_shape, dtype=value.dtype, device=value.device)
            grown[tuple(slice(0, size) for size in value.shape)] = value
            out[key] = grown
        else:
            out[key] = _clone(value)
    return out
