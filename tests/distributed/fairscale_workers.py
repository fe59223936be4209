"""fairscale OSS + ShardedDataParallel workers (module level for the spawn harness)."""
from __future__ import annotations

import gc
import weakref
from pathlib import Path

import torch

from tests.distributed.switch_common import (PLAN_RANKS, POST_STEPS, PRE_STEPS, fixed_input, local_batch, loss_fn,
                                             make_model, optimizer_factory, scheduler_factory, state_copy, train_steps)

SAVE_AFTER = 2  # post-switch steps before the checkpoint; the rest run twice (on, and resumed from it)


def oss_factory(params):
    """The OSS the tests use: AdamW inside, the hyper-parameters of switch_common.optimizer_factory."""
    from fairscale.optim import OSS

    return OSS(params, optim=torch.optim.AdamW, lr=5e-3, weight_decay=0.01)


def _owned(backend) -> dict[str, dict]:
    return {n: state_copy(s) for n, s in backend.local_states().items()}


def fairscale_switch_worker(rank: int, world: int, directory: str):
    """Dense steps, the plan's switch, post-switch steps with a checkpoint after SAVE_AFTER of them; then a fresh
    backend built from the checkpoint's layout and param groups runs the remaining steps again."""
    from dist_lowrank.backends.fairscale_backend import FairscaleBackend, oss_factory_from
    from dist_lowrank.checkpoint.manifest import apply_layout, layout_of
    from dist_lowrank.reshape.builders import switch_change

    errors = _bad_inputs()
    backend = FairscaleBackend(make_model(), oss_factory, scheduler_factory)
    wrapper_type = type(backend.model).__name__
    losses_pre = train_steps(backend, range(PRE_STEPS), rank, world)
    views = backend.shard_views(sorted(PLAN_RANKS))
    full_before = {n: p.detach().clone() for n, p in backend.module.named_parameters()}
    owners_before, owned_before = backend.owners(), _owned(backend)
    old_ref = weakref.ref(dict(backend.module.named_parameters())["net.2.weight"])
    old_optimizer = weakref.ref(backend.optimizer)
    measurements = backend.apply(switch_change(backend.unwrapped_model(), dict(PLAN_RANKS), PRE_STEPS))
    gc.collect()
    released = old_ref() is None and old_optimizer() is None
    owners_after, owned_after = backend.owners(), _owned(backend)
    factor_names = [n for n, _ in backend.module.named_parameters() if ".first." in n or ".second." in n]
    with torch.no_grad():
        out = backend.model(fixed_input())
    post = range(PRE_STEPS, PRE_STEPS + POST_STEPS)
    losses_post = train_steps(backend, post[:SAVE_AFTER], rank, world)
    checkpoint = Path(directory) / "ckpt"
    if rank == 0:
        checkpoint.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    backend.save_state(checkpoint, "{}")
    meta, layout = backend.engine_meta(), layout_of(backend.unwrapped_model())
    torch.distributed.barrier()
    losses_post += train_steps(backend, post[SAVE_AFTER:], rank, world)
    final = {n: p.detach().clone() for n, p in backend.module.named_parameters()}

    # resumed with gradient buckets (ShardedDDP's zero_grad keeps them right; the uninterrupted run has none) and
    # the OSS made from a plain torch factory (switch_common's AdamW: the same class and hyper-parameters)
    resumed = FairscaleBackend(apply_layout(make_model(), layout), oss_factory_from(optimizer_factory),
                               scheduler_factory,
                               sdp_kwargs={"reduce_buffer_size": 2 ** 20}, param_groups=meta["param_groups"])
    resumed.load_state(checkpoint, meta)
    resumed_owned = _owned(resumed)
    losses_resumed = train_steps(resumed, post[SAVE_AFTER:], rank, world)
    final_resumed = {n: p.detach().clone() for n, p in resumed.module.named_parameters()}
    resumed.backward(loss_fn(resumed.model, local_batch(PRE_STEPS + POST_STEPS, rank, world)))
    grad_norm = float(resumed.clip_grad_norm(1e9))  # no clipping: the global norm over the owners' gradients
    return {"views": [(v.name, v.dims, v.replicated) for v in views], "wrapper": wrapper_type,
            "losses_pre": losses_pre, "losses_post": losses_post, "losses_resumed": losses_resumed,
            "full_before": full_before, "out": out, "final": final, "final_resumed": final_resumed,
            "owners_before": owners_before, "owned_before": owned_before, "owners_after": owners_after,
            "owned_after": owned_after, "factor_names": factor_names, "released": released,
            "measurements": {k: v for k, v in measurements.items() if k in ("moved_states", "moved_state_bytes")},
            "resumed_owned": resumed_owned, "lr_after": [g["lr"] for g in backend.optimizer.param_groups],
            "lr_resumed": [g["lr"] for g in resumed.optimizer.param_groups], "errors": errors,
            "resumed_buckets": resumed.model._use_buckets, "grad_norm": grad_norm,
            "resumed_inner": type(resumed.optimizer.optim).__name__}  # fairscale private: whether buckets are in use


def _bad_inputs() -> dict[str, str]:
    """The one-line errors for an optimizer that is not OSS and for sdp_kwargs next to a ready wrapper."""
    from fairscale.nn.data_parallel import ShardedDataParallel

    from dist_lowrank.backends.fairscale_backend import FairscaleBackend
    from dist_lowrank.errors import DistLowRankError

    out = {}
    model = make_model()
    optimizer = oss_factory(model.parameters())
    cases = {"not_oss": lambda: FairscaleBackend(make_model(), lambda params: torch.optim.AdamW(params)),
             "sdp_kwargs": lambda: FairscaleBackend(ShardedDataParallel(model, optimizer, reduce_buffer_size=0),
                                                    optimizer, sdp_kwargs={"reduce_buffer_size": 0})}
    for name, case in cases.items():
        try:
            case()
            out[name] = "no error"
        except DistLowRankError as exc:
            out[name] = str(exc)
    return out


def fairscale_device_family(rank: int, world: int) -> dict:
    """The device-discipline family run (tests/distributed/device_workers.py) on this backend: monitor, step,
    profiled switch, InRank growth past capacity. fairscale counts as an engine there (its own allocations are
    its accelerator's), as torch.distributed and DeepSpeed do."""
    from tests.distributed.device_workers import check_family

    from dist_lowrank.backends.fairscale_backend import FairscaleBackend

    return check_family(lambda model, cfg: FairscaleBackend(model, oss_factory), rank, world)


def fairscale_all(rank: int, world: int, directory: str) -> dict:
    """Both runs in the same two processes (one start, one import of torch and fairscale)."""
    return {"switch": fairscale_switch_worker(rank, world, directory), "device": fairscale_device_family(rank, world)}
