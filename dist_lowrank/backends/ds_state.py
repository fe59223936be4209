"""ZeRO's optimizer state by parameter: read, snapshot, restore and write fp32 masters and Adam moments.

ZeRO keeps the fp32 masters and Adam state in flat partitions, one Adam step per flat group. Across a rebuild
the flat layout changes, so state moves by parameter through DeepSpeed's `safe_get/set_*` API:
- untouched parameters: a snapshot before the old engine goes, restored bit for bit into the new one. ZeRO-3:
  this rank's own partition (`safe_get_local_*`, no communication; an untouched parameter's partition is the
  same in the new engine); ZeRO-1/2: the full tensors (`safe_get_full_*`; the flat partitions are laid out
  anew, so local fragments do not map);
- new parameters: their full values and moments written (ZeRO-3: this rank's partition of them);
- the new flat partitions get Adam state first (zero moments, each group's step), so that there is a place to
  write to before the first step.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

MOMENTS = ("exp_avg", "exp_avg_sq")
Snapshot = dict[str, dict[str, torch.Tensor]]


def base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer that holds the flat fp32 partitions' state."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def flat_partitions(engine: Any) -> list[tuple[int, torch.Tensor]]:
    """(client param group index, flat fp32 partition) pairs whose state the torch optimizer holds.
    ZeRO-3 keeps its sub-group partitions outside `param_groups` between steps."""
    zero = engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        return [(zero.sub_group_to_group_id[i], flat) for i, flat in enumerate(zero.fp32_partitioned_groups_flat)]
    return [(i, flat) for i, group in enumerate(base_optimizer(engine).param_groups) for flat in group["params"]]


def group_steps(engine: Any) -> list[Optional[torch.Tensor]]:
    """Adam's step per client param group (None before the first optimizer step)."""
    base = base_optimizer(engine)
    steps: list[Optional[torch.Tensor]] = [None] * len(base.param_groups)
    for index, flat in flat_partitions(engine):
        if steps[index] is None and "step" in base.state.get(flat, {}):
            raw = base.state[flat]["step"]
            steps[index] = raw.clone() if isinstance(raw, torch.Tensor) else torch.tensor(float(raw))
    return steps


def set_group_steps(engine: Any, steps: list[Optional[float]]) -> None:
    """Give each param group's flat partitions the Adam step `steps[group]` (None: left as it is)."""
    base = base_optimizer(engine)
    for index, flat in flat_partitions(engine):
        state = base.state.get(flat)
        if state and "step" in state and index < len(steps) and steps[index] is not None:
            old = state["step"]
            state["step"] = torch.full_like(old, steps[index]) if isinstance(old, torch.Tensor) else steps[index]


def relink(engine: Any) -> None:
    """ZeRO-1/2 link each parameter's optimizer-state fragments once, right after the *first group's*
    first step (DeepSpeed 0.19.8 `_optimizer_step(group_no)`): groups after the first have no Adam state
    yet then, so their fragments stay empty ("exp_avg not found in optimizer state fragment"); after
    load_checkpoint they are not linked at all. Link again now that every group has state (local narrow()
    views, no communication). ZeRO-3 needs no links (a no-op there)."""
    zero = engine.optimizer
    if hasattr(zero, "_hp_optimizer_states_linked") and hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def create_state(engine: Any, steps: list[torch.Tensor]) -> None:
    """Adam state for the flat partitions that have none (zero moments, each group's step), then the
    fragment links (ZeRO-1/2 link optimizer-state fragments lazily, after the first step)."""
    base = base_optimizer(engine)
    for index, flat in flat_partitions(engine):
        if not base.state.get(flat):
            base.state[flat] = {"step": steps[index].clone(), **{k: torch.zeros_like(flat) for k in MOMENTS}}
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def full_moments(param: torch.Tensor) -> dict[str, torch.Tensor]:
    """Adam's moments of `param` as full fp32 tensors in its shape (collective: every rank calls it, in the same
    order; an all-reduce of the fragments on ZeRO-1/2, a gather on ZeRO-3). Links must be in place (`relink`)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    return {k: safe_get_full_optimizer_state(param, k).detach().float() for k in MOMENTS}


def snapshot(engine: Any, stage: int, params: dict[str, nn.Parameter], has_state: bool) -> Snapshot:
    """fp32 master (and moments, `has_state`) of each trainable parameter in `params`: this rank's partition
    (ZeRO-3) or the full tensors (ZeRO-0/1/2). Frozen ones (no master, no moments) stay in the module."""
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_get_local_fp32_param,
                                 safe_get_local_optimizer_state)

    if has_state:
        relink(engine)
    out = {}
    for name, param in params.items():
        if not param.requires_grad:
            continue
        if stage == 3:
            entry = {"fp32": safe_get_local_fp32_param(param).clone()}
            if has_state:
                entry.update({k: safe_get_local_optimizer_state(param, k).clone() for k in MOMENTS})
        else:
            entry = {"fp32": safe_get_full_fp32_param(param).clone()}
            if has_state:
                entry.update({k: safe_get_full_optimizer_state(param, k).clone() for k in MOMENTS})
        out[name] = entry
    return out


def restore(stage: int, params: dict[str, nn.Parameter], saved: Snapshot) -> None:
    """Write a `snapshot` back, into the same-named parameters of the new engine."""
    from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state, safe_set_local_fp32_param,
                                 safe_set_local_optimizer_state)

    for name, entry in saved.items():
        param = params[name]
        if stage == 3:
            safe_set_local_fp32_param(param, entry["fp32"])
            for key in MOMENTS:
                if key in entry:
                    safe_set_local_optimizer_state(param, entry[key], key)
        else:
            safe_set_full_fp32_param(param, entry["fp32"])
            for key in MOMENTS:
                if key in entry:
                    safe_set_full_optimizer_state(param, entry[key], key)


def local_partition(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a ZeRO-3 parameter's flat, padded layout, cut from the full tensor."""
    part = param.ds_tensor.numel()
    flat = torch.zeros(part * dist.get_world_size(), dtype=torch.float32, device=full.device)
    flat[: full.numel()] = full.reshape(-1).float()
    return flat[dist.get_rank() * part:(dist.get_rank() + 1) * part].to(param.ds_tensor.device)


def write_param(stage: int, param: torch.Tensor, full: torch.Tensor) -> None:
    """The module's working copy of a parameter (bf16/fp16/fp32) from its full value: ZeRO-3 this rank's partition
    (`ds_tensor`), ZeRO-0/1/2 the replicated tensor. The fp32 master is `write_full`'s."""
    with torch.no_grad():
        if stage == 3:
            param.ds_tensor.copy_(local_partition(param, full))
        else:
            param.data.copy_(full.reshape(param.shape))


def write_full(stage: int, params: dict[str, nn.Parameter], values: dict[str, torch.Tensor],
               states: dict[str, dict[str, Any]]) -> None:
    """fp32 masters (and moments) of changed parameters from full tensors: ZeRO-3 writes this rank's
    partition, ZeRO-0/1/2 the full tensor (DeepSpeed keeps the fragments). A state's non-moment entries (Adam's
    step) are the param group's business, not written here."""
    from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state, safe_set_local_fp32_param,
                                 safe_set_local_optimizer_state)

    for pname, value in values.items():
        param = params[pname]
        shape = tuple(getattr(param, "ds_shape", param.shape))
        state = states.get(pname) or {}
        entries = {None: value, **{k: state[k] for k in MOMENTS if k in state}}
        for key, full in entries.items():
            full = full.reshape(shape).float()
            if stage == 3:
                local = local_partition(param, full)
                if key is None:
                    safe_set_local_fp32_param(param, local)
                else:
                    safe_set_local_optimizer_state(param, local, key)
            elif key is None:
                safe_set_full_fp32_param(param, full.to(param.device))
            else:
                safe_set_full_optimizer_state(param, full.to(param.device), key)


def full_fp32(param: torch.Tensor) -> torch.Tensor:
    """The full fp32 value of a parameter (collective under ZeRO-3): the optimizer's master copy, or for
    a frozen parameter (no master, e.g. InRank's W0) the gathered module parameter."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param) if param.requires_grad else None
    if value is None:
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            value = param.detach().clone()
    return value.detach().float().cpu()
