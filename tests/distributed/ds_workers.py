"""DeepSpeed ZeRO switch worker (module level for the spawn harness)."""
from __future__ import annotations

import gc
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from tests.distributed.switch_common import (train_after_switch, GLOBAL_BATCH, PLAN_RANKS, PRE_STEPS, UNTOUCHED, fixed_input,
                                      local_batch, loss_fn, make_model, optimizer_factory, scheduler_factory)
from dist_lowrank.reshape.builders import switch_change


def ds_config(stage: int, world: int) -> dict:
    return {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
            "gradient_accumulation_steps": 1, "zero_optimization": {
                "stage": stage, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 10**6,
                "allgather_bucket_size": 10**6},
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def _full_states(backend, names):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = dict(backend.engine.module.named_parameters())
    return {n: {"fp32": safe_get_full_fp32_param(params[n]).clone(),
                **{k: safe_get_full_optimizer_state(params[n], k).clone() for k in ("exp_avg", "exp_avg_sq")}}
            for n in names}


def _gathered(module):
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {n: p.detach().clone() for n, p in module.named_parameters()}


CONV_RANKS = {"features.2": 4, "proj": 5}


class ConvNet(nn.Module):
    """Conv2d layers and a GPT-2 style HF Conv1D (weight stored in×out): the non-Linear layouts."""

    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 12, 3, padding=1),
                                      nn.Tanh())
        self.proj = Conv1D(20, 12 * 16)
        self.head = nn.Linear(20, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(self.features(x).flatten(1))))


def make_conv_model() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet()


def conv_batch(step: int, rank: int, world: int):
    gen = torch.Generator().manual_seed(2000 + step)
    x = torch.randn(GLOBAL_BATCH, 3, 4, 4, generator=gen)
    y = (x[:, 0].sum((1, 2)) > 0).long() + (x[:, 1, 0, 0] > 1).long()
    per = GLOBAL_BATCH // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def conv_input() -> torch.Tensor:
    return torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(9))


def ds_conv_switch(rank: int, world: int, stage: int) -> dict:
    """Conv2d + Conv1D under ZeRO: shard views in stored layout, switch output vs a reference."""
    from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend
    backend = DeepSpeedBackend(make_conv_model(), ds_config(stage, world), optimizer_factory)
    for step in range(2):
        x, y = conv_batch(step, rank, world)
        backend.backward(F.cross_entropy(backend.model(x), y))
        backend.step()
    views = [(v.name, v.dims, v.flat_offset, v.local_flat.clone(), v.replicated)
             for v in backend.shard_views(sorted(CONV_RANKS))]
    full_before = _gathered(backend.engine.module)
    backend.apply(switch_change(backend.unwrapped_model(), dict(CONV_RANKS), 2))
    with torch.no_grad():
        out = backend.model(conv_input())
    x, y = conv_batch(2, rank, world)
    loss = F.cross_entropy(backend.model(x), y)
    backend.backward(loss)
    backend.step()
    return {"views": views, "full_before": full_before, "out": out, "loss": float(loss.detach())}


def ds_switch_worker(rank: int, world: int, stage: int):
    from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend
    backend = DeepSpeedBackend(make_model(), ds_config(stage, world), optimizer_factory, scheduler_factory)
    for step in range(PRE_STEPS):
        backend.backward(loss_fn(backend.model, local_batch(step, rank, world)))
        backend.step()
    views = [(v.name, v.dims, v.flat_offset, v.local_flat.clone(), v.replicated)
             for v in backend.shard_views(sorted(PLAN_RANKS))]
    from dist_lowrank.monitor import RankMonitor

    monitor = RankMonitor("lanczos", 20)
    estimates = {n: r.value for n, r in monitor.estimate(backend.shard_views(sorted(PLAN_RANKS))).items()}
    monitor_bytes = monitor.stats.bytes
    full_before = _gathered(backend.engine.module)
    state_before = _full_states(backend, UNTOUCHED)
    old_ref = weakref.ref(dict(backend.engine.module.named_parameters())["net.2.weight"])
    base = backend.engine.optimizer.optimizer
    old_state_ref = weakref.ref(next(iter(base.state.values()))["exp_avg"])
    old_engine_ref = weakref.ref(backend.engine)
    del base
    steps_before = backend.engine.global_steps
    measurements = backend.apply(switch_change(backend.unwrapped_model(), dict(PLAN_RANKS), PRE_STEPS))
    gc.collect()
    released = old_state_ref() is None and old_ref() is None and old_engine_ref() is None
    state_after = _full_states(backend, UNTOUCHED)
    names = [n for n, _ in backend.engine.module.named_parameters()]
    factor_names = [n for n in names if n not in UNTOUCHED]
    factor_moments_zero = all(float(v.abs().max()) == 0.0 for n, s in _full_states(backend, factor_names).items()
                              for k, v in s.items() if k != "fp32")
    partitioned = all(getattr(p, "ds_tensor", p).numel() < getattr(p, "ds_numel", 10**9)
                      for p in backend.engine.module.parameters() if getattr(p, "ds_numel", 0) > 8) if stage == 3 else None
    with torch.no_grad():
        out = backend.model(fixed_input())
    factors_before = {n: v for n, v in _gathered(backend.engine.module).items() if n in factor_names}
    losses = train_after_switch(backend, rank, world)
    final = _gathered(backend.engine.module)
    factors_changed = all(not torch.equal(final[n], v) for n, v in factors_before.items())
    return {"views": views, "full_before": full_before, "state_before": state_before, "state_after": state_after,
            "factor_moments_zero": factor_moments_zero, "partitioned": partitioned, "out": out, "losses": losses,
            "final": final, "released": released, "factors_changed": factors_changed,
            "steps": (steps_before, backend.engine.global_steps), "measurements": measurements,
            "estimates": estimates, "monitor_bytes": monitor_bytes, "conv": ds_conv_switch(rank, world, stage)}
