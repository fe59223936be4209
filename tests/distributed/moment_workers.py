"""Workers for tests/distributed/test_factor_moments.py (module level for the spawn harness): train full rank,
switch with factor_moments=projected and lr_scale, and read back, with plain torch / DeepSpeed's public
safe_get API, W's moments before and the factors' moments, steps and lrs after."""
from __future__ import annotations

from typing import Any

import torch

from tests.distributed.ds_workers import ds_config
from tests.distributed.switch_common import (PLAN_RANKS, PRE_STEPS, local_batch, loss_fn, make_model,
                                             optimizer_factory, scheduler_factory)
from dist_lowrank.reshape.builders import switch_change

MOMENTS = ("exp_avg", "exp_avg_sq")
LR_SCALE = 0.5


def _full(value: torch.Tensor) -> torch.Tensor:
    return (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone().float()


def _read(backend: Any, names: list[str]) -> dict[str, dict]:
    """Per parameter name: full value, exp_avg, exp_avg_sq, Adam step (DeepSpeed: its flat group's) and lr."""
    out: dict[str, dict] = {}
    if hasattr(backend, "engine"):
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        engine = backend.engine
        zero = engine.optimizer
        base = getattr(zero, "optimizer", zero)
        ids = {id(p): n for n, p in engine.module.named_parameters()}
        if hasattr(zero, "sub_group_to_group_id"):  # ZeRO-3
            members = [(zero.sub_group_to_group_id[i], g) for i, g in enumerate(zero.fp16_groups)]
            flats = {i: zero.fp32_partitioned_groups_flat[s] for s, i in zero.sub_group_to_group_id.items()}
        else:
            members = list(enumerate(zero.bit16_groups))
            flats = {i: g["params"][0] for i, g in enumerate(base.param_groups)}
        group_of = {ids[id(p)]: i for i, params in members for p in params}
        params = dict(engine.module.named_parameters())
        for n in names:
            g = group_of[n]
            out[n] = {"value": safe_get_full_fp32_param(params[n]).clone(),
                      **{k: safe_get_full_optimizer_state(params[n], k).clone() for k in MOMENTS},
                      "step": float(base.state[flats[g]]["step"]), "lr": float(base.param_groups[g]["lr"])}
        del deepspeed
        return out
    module = backend.unwrapped_model()
    params = dict(module.named_parameters())
    lr_of = {id(p): float(g["lr"]) for g in backend.optimizer.param_groups for p in g["params"]}
    for n in names:
        state = backend.optimizer.state[params[n]]
        out[n] = {"value": _full(params[n]), **{k: _full(state[k]) for k in MOMENTS},
                  "step": float(state["step"]), "lr": lr_of[id(params[n])]}
    return out


def _make(kind: str, world: int):
    if kind == "ddp":
        from dist_lowrank.backends.ddp_backend import DDPBackend

        return DDPBackend(make_model(), optimizer_factory, scheduler_factory)
    if kind == "fsdp2":
        from dist_lowrank.backends.fsdp2_backend import FSDP2Backend
        from tests.distributed.fsdp_workers import parallelize

        return FSDP2Backend(make_model, parallelize, optimizer_factory, scheduler_factory)
    from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend

    return DeepSpeedBackend(make_model(), ds_config(int(kind[-1]), world), optimizer_factory, scheduler_factory)


def projected_switch_worker(rank: int, world: int, kind: str) -> dict:
    """kind: ddp | fsdp2 | zero1 | zero2 | zero3."""
    backend = _make(kind, world)
    for step in range(PRE_STEPS):
        backend.backward(loss_fn(backend.model, local_batch(step, rank, world)))
        backend.step()
    dense = sorted(f"{layer}.{leaf}" for layer in PLAN_RANKS for leaf in ("weight", "bias")) + ["net.0.weight"]
    before = _read(backend, dense)
    backend.apply(switch_change(backend.unwrapped_model(), dict(PLAN_RANKS), PRE_STEPS, "projected", LR_SCALE))
    new = sorted(f"{layer}.{leaf}" for layer in PLAN_RANKS for leaf in ("first.weight", "second.weight", "second.bias"))
    after = _read(backend, new + ["net.0.weight"])
    loss = loss_fn(backend.model, local_batch(PRE_STEPS, rank, world))
    backend.backward(loss)
    backend.step()  # the scheduler steps: the factors' lr must stay lr_scale × the others'
    stepped = _read(backend, new + ["net.0.weight"])
    return {"before": before, "after": after, "lr_after_step": {n: s["lr"] for n, s in stepped.items()},
            "loss": float(loss.detach())}
