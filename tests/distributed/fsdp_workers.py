"""FSDP2 switch workers (module level for the spawn harness)."""
from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

from tests.distributed.switch_common import (train_after_switch, PLAN_RANKS, POST_STEPS, PRE_STEPS, UNTOUCHED, fixed_input, local_batch,
                                      loss_fn, make_model, optimizer_factory, scheduler_factory)


def parallelize(model: nn.Module) -> nn.Module:
    """Shard every Linear (or factor pair's halves) on its own, then the root."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)
    return model


def _full_state(optimizer, params: dict, names) -> dict:
    out = {}
    for name in names:
        state = optimizer.state[params[name]]
        out[name] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                     for k, v in state.items()}
    return out


def fsdp2_switch_worker(rank: int, world: int):
    from torch.distributed.tensor import DTensor

    from dist_lowrank.backends.fsdp2_backend import FSDP2Backend
    from dist_lowrank.plan import Plan

    backend = FSDP2Backend(make_model, parallelize, optimizer_factory, scheduler_factory)
    for step in range(PRE_STEPS):
        backend.backward(loss_fn(backend.model, local_batch(step, rank, world)))
        backend.step()
    views = backend.shard_views(sorted(PLAN_RANKS))
    from dist_lowrank.monitor import RankMonitor

    monitor = RankMonitor("lanczos", 20)
    estimates = {n: r.value for n, r in monitor.estimate(views).items()}
    monitor_bytes = monitor.stats.bytes
    params = dict(backend.model.named_parameters())
    full_before = {n: p.full_tensor().detach().clone() for n, p in params.items()}
    state_before = _full_state(backend.optimizer, params, UNTOUCHED)
    old_ref = weakref.ref(params["net.2.weight"])
    del params
    backend.execute(Plan("switch", PRE_STEPS, dict(PLAN_RANKS)))
    gc.collect()
    released = old_ref() is None
    params = dict(backend.model.named_parameters())
    all_dtensor = all(isinstance(p, DTensor) for p in params.values())
    state_after = _full_state(backend.optimizer, params, UNTOUCHED)
    new_factor_state = [bool(backend.optimizer.state.get(p)) for n, p in params.items() if n not in state_after]
    with torch.no_grad():
        out = backend.model(fixed_input())
    factors_before = {n: p.full_tensor().clone() for n, p in params.items() if ".first." in n or ".second." in n}
    losses = train_after_switch(backend, rank, world)
    final = {n: p.full_tensor().detach().clone() for n, p in backend.model.named_parameters()}
    factors_changed = all(not torch.equal(final[n], v) for n, v in factors_before.items())
    return {"views": [(v.name, v.dims, v.flat_offset, v.local_flat.clone()) for v in views],
            "full_before": full_before, "state_before": state_before, "state_after": state_after,
            "new_factor_state": new_factor_state, "out": out, "losses": losses, "final": final,
            "released": released, "factors_changed": factors_changed, "all_dtensor": all_dtensor,
            "estimates": estimates, "monitor_bytes": monitor_bytes}


def fsdp2_uneven_views_worker(rank: int, world: int):
    """7 rows over 2 ranks: the views must tile the flattened matrix exactly."""
    from dist_lowrank.backends.fsdp2_backend import FSDP2Backend

    def model_fn():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))

    backend = FSDP2Backend(model_fn, parallelize, optimizer_factory)
    view = backend.shard_views(["0"])[0]
    return view.dims, view.flat_offset, view.local_flat.clone()
