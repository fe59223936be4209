"""Workers for tests/distributed/test_param_groups.py (module level for the spawn harness): run
examples/param_groups_accumulation.py and read back what the engine really holds."""
from __future__ import annotations

from typing import Any

import torch

WATCHED = ("0.weight", "6.bias")  # parameters no switch touches: their Adam state is compared


def _hyper(group: dict) -> tuple:
    return (float(group["lr"]), float(group["weight_decay"]), tuple(group["betas"]), group.get("tag"))


def _full(value: torch.Tensor) -> torch.Tensor:
    return (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()


def inspect(handle: Any, scheduler: Any) -> dict:
    """Per parameter name its group's (lr, weight_decay, betas, tag) as the live optimizer holds them; the
    untouched parameters' exp_avg_sq; the Adam step each parameter's group is at; the scheduler's identity
    and position."""
    out: dict[str, Any] = {"last_epoch": scheduler.last_epoch}
    if hasattr(handle, "controller") and hasattr(handle, "engine"):  # DeepSpeed proxy
        from deepspeed.utils import safe_get_full_optimizer_state

        engine = handle.engine
        module, zero = engine.module, engine.optimizer
        base = getattr(zero, "optimizer", zero)
        names = {id(p): n for n, p in module.named_parameters()}
        if hasattr(zero, "fp16_groups") and hasattr(zero, "sub_group_to_group_id"):  # ZeRO-3
            members = [(zero.sub_group_to_group_id[i], g) for i, g in enumerate(zero.fp16_groups)]
            flats = {i: zero.fp32_partitioned_groups_flat[s] for s, i in zero.sub_group_to_group_id.items()}
        else:
            members = list(enumerate(zero.bit16_groups))
            flats = {i: g["params"][0] for i, g in enumerate(base.param_groups)}
        out["groups"] = {names[id(p)]: _hyper(base.param_groups[i]) for i, params in members for p in params}
        out["steps"] = {names[id(p)]: float(base.state[flats[i]]["step"]) for i, params in members for p in params}
        params = dict(module.named_parameters())
        out["state"] = {n: safe_get_full_optimizer_state(params[n], "exp_avg_sq").clone() for n in WATCHED}
        out["same_scheduler"] = engine.lr_scheduler is scheduler
        out["n_groups"] = len(base.param_groups)
    else:
        module = handle.unwrapped_model()
        names = {id(p): n for n, p in module.named_parameters()}
        opt = handle.optimizer
        out["groups"] = {names[id(p)]: _hyper(g) for g in opt.param_groups for p in g["params"]}
        out["steps"] = {names[id(p)]: float(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"]}
        params = dict(module.named_parameters())
        out["state"] = {n: _full(opt.state[params[n]]["exp_avg_sq"]) for n in WATCHED}
        out["same_scheduler"] = handle.scheduler is scheduler and scheduler.optimizer is opt
        out["n_groups"] = len(opt.param_groups)
    return out


def example_worker(rank: int, world: int, backend: str, steps: int):
    from examples.param_groups_accumulation import main

    return main(backend, steps, inspect=inspect)
