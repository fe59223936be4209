"""Workers of the shrink tests: switch, train, then a factorized layer's rank goes down (reshape.builders.shrink_change)
on every engine; values and optimizer state are read back with each engine's own API (not the pipeline's)."""
from __future__ import annotations

import torch

from dist_lowrank.reshape.builders import shrink_change, switch_change
from tests.distributed.switch_common import PLAN_RANKS, PRE_STEPS, make_model, optimizer_factory, train_steps

SHRUNK, KEEP = "net.2", 3  # net.2 goes from rank 6 to 3
POST = 2                   # steps between the switch and the shrink
MOMENTS = ("exp_avg", "exp_avg_sq")


def make_backend(kind: str, world: int, model_fn=make_model, optimizer=optimizer_factory, ds_extra=None):
    """The engine `kind` (local, ddp, fsdp2, zero1/2/3) around `model_fn()` with the `optimizer` factory."""
    if kind == "local":
        from dist_lowrank.backends.local_backend import LocalBackend

        return LocalBackend(model_fn(), optimizer)
    if kind == "ddp":
        from dist_lowrank.backends.ddp_backend import DDPBackend

        return DDPBackend(model_fn(), optimizer)
    if kind == "fsdp2":
        from dist_lowrank.backends.fsdp2_backend import FSDP2Backend
        from tests.distributed.fsdp_workers import parallelize

        return FSDP2Backend(model_fn, parallelize, optimizer)
    from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend
    from tests.distributed.ds_workers import ds_config

    return DeepSpeedBackend(model_fn(), {**ds_config(int(kind[-1]), world), **(ds_extra or {})}, optimizer)


def read_full(kind: str, backend) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's full value and Adam moments (+ step on torch optimizers), through the engine's own API."""
    out = {}
    for name, param in backend.unwrapped_model().named_parameters():
        if kind.startswith("zero"):
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            entry = {"value": safe_get_full_fp32_param(param).clone()}
            entry.update({k: safe_get_full_optimizer_state(param, k).clone() for k in MOMENTS})
        else:
            full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731 - FSDP2 DTensors
            state = backend.optimizer.state[param]
            entry = {"value": full(param.detach()).clone(), "step": state["step"].clone()}
            entry.update({k: full(state[k]).clone() for k in MOMENTS})
        out[name] = {k: v.detach().cpu() for k, v in entry.items()}
    return out


def shrink_worker(rank: int, world: int, kind: str) -> dict:
    torch.manual_seed(0)
    backend = make_backend(kind, world)
    train_steps(backend, range(PRE_STEPS), rank, world)
    backend.apply(switch_change(backend.unwrapped_model(), dict(PLAN_RANKS), PRE_STEPS))
    train_steps(backend, range(PRE_STEPS, PRE_STEPS + POST), rank, world)
    before = read_full(kind, backend)
    measurements = backend.apply(shrink_change(backend.unwrapped_model(), {SHRUNK: KEEP}, PRE_STEPS + POST))
    after = read_full(kind, backend)
    losses = train_steps(backend, [PRE_STEPS + POST], rank, world)
    final = read_full(kind, backend)
    return {"before": before, "after": after, "final": final, "losses": losses,
            "rank": backend.unwrapped_model().get_submodule(SHRUNK).rank,
            "params_before": measurements["params_before"], "params_after": measurements["params_after"]}
