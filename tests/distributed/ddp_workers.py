"""DDP switch worker (module level for the spawn harness)."""
from __future__ import annotations

import gc
import weakref

import torch

from tests.distributed.switch_common import (train_after_switch, PLAN_RANKS, PRE_STEPS, UNTOUCHED, fixed_input, local_batch,
                                      loss_fn, make_model, optimizer_factory, scheduler_factory, state_copy)
from dist_lowrank.reshape.builders import switch_change


def ddp_switch_worker(rank: int, world: int):
    from dist_lowrank.backends.ddp_backend import DDPBackend
    backend = DDPBackend(make_model(), optimizer_factory, scheduler_factory)
    for step in range(PRE_STEPS):
        backend.backward(loss_fn(backend.model, local_batch(step, rank, world)))
        backend.step()
    views = backend.shard_views(sorted(PLAN_RANKS))
    full_before = {n: p.detach().clone() for n, p in backend.module.named_parameters()}
    params = dict(backend.module.named_parameters())
    state_before = {n: state_copy(backend.optimizer.state[params[n]]) for n in UNTOUCHED}
    old_ref = weakref.ref(params["net.2.weight"])
    del params
    measurements = backend.apply(switch_change(backend.unwrapped_model(), dict(PLAN_RANKS), PRE_STEPS))
    gc.collect()
    released = old_ref() is None
    params = dict(backend.module.named_parameters())
    state_after = {n: state_copy(backend.optimizer.state[params[n]]) for n in UNTOUCHED}
    new_factor_state = [bool(backend.optimizer.state.get(params[n])) for n in params if ".first." in n or ".second." in n]
    with torch.no_grad():
        out = backend.model(fixed_input())
    factors_before = {n: p.detach().clone() for n, p in params.items() if ".first." in n or ".second." in n}
    losses = train_after_switch(backend, rank, world)
    final = {n: p.detach().clone() for n, p in backend.module.named_parameters()}
    factors_changed = all(not torch.equal(final[n], v) for n, v in factors_before.items())
    return {"views": [(v.name, v.dims, v.replicated) for v in views], "full_before": full_before,
            "state_before": state_before, "state_after": state_after, "new_factor_state": new_factor_state,
            "out": out, "losses": losses, "final": final, "released": released,
            "factors_changed": factors_changed, "measurements": measurements}
