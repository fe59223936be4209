"""Carry a torch optimizer's per-parameter state across a rebuild, by parameter name.

Untouched parameters keep every state tensor bit for bit, whatever the optimizer keeps per parameter
(Adam/AdamW: step, exp_avg, exp_avg_sq, max_exp_avg_sq with amsgrad; SGD: momentum_buffer); DTensor
states (FSDP2) are carried as they are, i.e. each rank keeps its own local shard.

New parameters (the factors) enter as the switch's `factor_moments` says (the same on every backend):

* `zero` (default): *no* state. torch's Adam keeps a per-parameter step and creates the state lazily at the
  parameter's first update: zero moments and step 0, so its bias correction (1 - beta^t with the parameter's
  own t) treats them as the fresh parameters they are. Giving them the global step instead would switch the
  bias correction off while the zero-started exp_avg_sq is still far too small: with the default betas their
  early updates would come out 3x (first step) to 6.5x (tenth step) larger than Adam's normal lr-sized
  steps, right after a spectral init that should be disturbed least. Works for any torch optimizer without
  knowing its private state layout (fused/capturable step tensors).
* `projected`: W's moments carried into the factors' parameterization (linalg/moments.py): with A, B the
  factors at the switch, exp_avg_A = M Bᵀ, exp_avg_B = Aᵀ M (exact: the EMA of the gradients the factors
  would have had), exp_avg_sq_A = V (B∘B)ᵀ, exp_avg_sq_B = (A∘A)ᵀ V (a diagonal approximation: the cross
  terms Adam never kept are dropped), the bias's state as it was, and the factors' step = W's step, so the
  bias correction matches the carried moments. Keys follow Adam's names (exp_avg_sq, max_exp_avg_sq squared, other W-shaped
  tensors linear, scalars copied); an optimizer with other state keys gets them projected linearly.

`lr_scale` (rebase in param_groups) puts the factors in companion groups whose lr is their origin group's × it.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from dist_lowrank.backends.param_groups import GroupLayout, Origin, rebind_scheduler, rebuilt_optimizer
from dist_lowrank.errors import DistLowRankError
from dist_lowrank.faults import maybe_fault


def _clone(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def snapshot_state(optimizer: torch.optim.Optimizer, named_params: dict[str, nn.Parameter],
                   copy: bool = True) -> dict[str, dict]:
    """{name: optimizer state of that parameter} (params without state are left out).

    copy=False takes the state tensors themselves instead of copies: for a caller that drops `optimizer`
    right after (a rebuild), so the switch does not hold the untouched state twice.
    """
    out = {}
    for name, param in named_params.items():
        state = optimizer.state.get(param)
        if state:
            out[name] = {k: _clone(v) for k, v in state.items()} if copy else dict(state)
    return out


def transplant_state(optimizer: torch.optim.Optimizer, named_params: dict[str, nn.Parameter],
                     snapshot: dict[str, dict], zero_init_names: Iterable[str] = ()) -> None:
    """Install snapshot entries into `optimizer` for the same-named params (the snapshot's tensors are
    installed as they are, not copied). Names in `zero_init_names` start fresh even if the snapshot has
    them (see the module docstring). Every tensor state must have the parameter's shape."""
    fresh = set(zero_init_names)
    for name, state in snapshot.items():
        if name in fresh:
            continue
        if name not in named_params:
            raise DistLowRankError(f"{name}: has optimizer state but no parameter in the rebuilt model")
        param = named_params[name]
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise DistLowRankError(f"{name}: optimizer state {key} has shape {tuple(value.shape)}, "
                                       f"parameter has {tuple(param.shape)}")
        optimizer.state[param] = dict(state)


def install_states(optimizer: torch.optim.Optimizer, named_params: dict[str, nn.Parameter],
                   states: dict[str, dict]) -> None:
    """Install full-tensor states (factor_moments: projected) for the named new parameters, each tensor
    reshaped to its parameter (the factors' states come in matrix form, a Conv2d factor is 4-D)."""
    for name, state in states.items():
        param = named_params[name]
        optimizer.state[param] = {k: v.reshape(param.shape).to(param.device) if isinstance(v, torch.Tensor)
                                  and v.dim() > 0 else v for k, v in state.items()}


def rebuild_optimizer(recipe: Callable, layout: GroupLayout, named_params: dict[str, nn.Parameter],
                      snapshot: dict[str, dict], scheduler: Any,
                      origins: Optional[list[Origin]] = None) -> torch.optim.Optimizer:
    """A new optimizer over the rebuilt model's parameters with `layout`'s groups (and hyper-parameters) and
    the snapshot installed; the scheduler instance, if any, is re-bound to it at its old position (its LR
    schedule and step count continue across the rebuild). `origins`: old group of each new group (default:
    the same index)."""
    optimizer = rebuilt_optimizer(recipe, layout, named_params)
    maybe_fault("transplant")
    transplant_state(optimizer, named_params, snapshot)
    if scheduler is not None:
        rebind_scheduler(scheduler, optimizer, origins or [Origin(i) for i in range(len(layout))])
    return optimizer


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


def group_hyperparams(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's hyperparameters (lr as a scheduler left it, betas, ...), without the params."""
    return [{k: _clone(v) for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def restore_group_hyperparams(optimizer: torch.optim.Optimizer, saved: list[dict[str, Any]]) -> None:
    """Put saved hyperparameters back into a rebuilt optimizer with the same number of groups."""
    if len(saved) != len(optimizer.param_groups):
        raise DistLowRankError(f"optimizer: checkpoint has {len(saved)} param groups, the rebuilt optimizer "
                               f"{len(optimizer.param_groups)}")
    for group, values in zip(optimizer.param_groups, saved):
        group.update(values)
