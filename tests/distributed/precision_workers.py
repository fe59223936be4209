"""Mixed-precision switches on real ranks: DeepSpeed bf16 / fp16 (dynamic loss scale), FSDP2 with a
MixedPrecisionPolicy, DDP under torch.autocast. One worker runs them all (one process start, one import).

Each scenario trains a few steps, records the fp32 values the switch must start from (DeepSpeed: the fp32
masters; FSDP2 / DDP: the fp32 parameters), switches layers "2" and "4" with layer profiling on, and returns
what the test compares with plain torch: the factors as stored (training dtype) and as fp32 masters, the
monitor's stable ranks, the recorded timing dtypes, the loss scaler before / after the rebuild.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

RANKS = {"2": 8, "4": 6}
LOWRANK = {"strategy": "cuttlefish", "target_modules": ["2", "4"], "monitor": {"method": "lanczos", "steps": 40},
           "switch": {"profile_layers": True, "profile_iters": 1, "min_speedup": 1e-6}}
# 2^24 overflows fp16 gradients at first: the scale comes down (hysteresis 2, then halving) before the switch
FP16 = {"enabled": True, "initial_scale_power": 24, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
SCALER_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _controller(backend):
    from dist_lowrank.config import config_from_dict
    from dist_lowrank.controller import LowRankController

    return LowRankController(backend, config_from_dict(LOWRANK))


def _train(backend, controller, batches, steps: int, dtype=None, autocast=None) -> list[float]:
    """The user's loop: batch on the model's device (and in the engine's dtype), optional autocast."""
    from examples.common import to_model_device

    losses = []
    for _ in range(steps):
        x, y = to_model_device(backend.model, *next(batches))
        x = x.to(dtype) if dtype is not None else x
        with controller.record_shapes(), torch.autocast(x.device.type, dtype=autocast or torch.bfloat16,
                                                         enabled=autocast is not None):
            out = backend.model(x)
        loss = F.cross_entropy(out.float(), y)
        backend.backward(loss)
        backend.step()
        losses.append(float(loss.detach()))
    return losses


def _formats(controller) -> dict[str, list]:
    return {n: [str(getattr(s, "dtype", None)), str(getattr(s, "autocast", None))]
            for n, s in controller.input_shapes.items()}


def deepspeed_case(rank: int, world: int, stage: int, precision: str) -> dict[str, Any]:
    """A ZeRO engine in bf16 or fp16: masters, factors and loss scaler around a switch."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend
    from dist_lowrank.plan import Plan
    from examples.common import digits, mlp

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    config = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "steps_per_print": 10**9, precision: FP16 if precision == "fp16" else {"enabled": True}}
    backend = DeepSpeedBackend(mlp(), config, lambda p: torch.optim.AdamW(p, lr=1e-3))
    controller = _controller(backend)
    batches = digits(rank, world, batch=16, seed=1)
    losses = _train(backend, controller, batches, 10, dtype)
    modules = dict(backend.unwrapped_model().named_modules())
    masters = {n: safe_get_full_fp32_param(modules[n].weight).detach().double().cpu() for n in RANKS}
    views = backend.shard_views(list(RANKS))
    view_dtypes = {v.name: str(v.local_flat.dtype) for v in views}
    sranks = {n: r.value for n, r in controller.monitor.estimate(views).items()}
    scaler = backend.engine.optimizer.loss_scaler
    before = {k: getattr(scaler, k, None) for k in SCALER_KEYS}
    skipped_before = backend.engine.skipped_steps
    controller.execute(Plan("switch", 10, dict(RANKS)))
    scaler = backend.engine.optimizer.loss_scaler
    after = {k: getattr(scaler, k, None) for k in SCALER_KEYS}
    skipped_after = backend.engine.skipped_steps
    modules = dict(backend.unwrapped_model().named_modules())
    stored, fp32 = {}, {}
    for name in RANKS:
        first, second = modules[name].first.weight, modules[name].second.weight
        with deepspeed.zero.GatheredParameters([first, second], enabled=stage == 3):
            stored[name] = (second.detach().cpu().clone(), first.detach().cpu().clone())
        fp32[name] = (safe_get_full_fp32_param(second).detach().cpu(), safe_get_full_fp32_param(first).detach().cpu())
    losses += _train(backend, controller, batches, 3, dtype)
    return {"masters": masters, "sranks": sranks, "view_dtypes": view_dtypes, "stored": stored, "fp32": fp32,
            "scaler_before": before,
            "scaler_after": after, "skipped_before": skipped_before, "skipped_after": skipped_after,
            "skipped_end": backend.engine.skipped_steps, "scale_end": backend.engine.optimizer.loss_scaler.cur_scale,
            "losses": losses, "formats": _formats(controller),
            "timed": sorted(controller.events[-1].get("timing", {}))}


def fsdp2_case(rank: int, world: int) -> dict[str, Any]:
    """FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) in the user's sharding function."""
    from dist_lowrank.backends.fsdp2_backend import FSDP2Backend
    from dist_lowrank.plan import Plan
    from examples.common import digits, mlp, to_model_device
    from examples.mixed_precision import shard_bf16  # the README example's sharding function

    backend = FSDP2Backend(mlp, shard_bf16, lambda p: torch.optim.AdamW(p, lr=1e-3))
    controller = _controller(backend)
    batches = digits(rank, world, batch=16, seed=1)
    losses = _train(backend, controller, batches, 3)
    modules = dict(backend.model.named_modules())
    masters = {n: modules[n].weight.full_tensor().detach().double().cpu() for n in RANKS}
    sranks = {n: r.value for n, r in controller.monitor.estimate(backend.shard_views(list(RANKS))).items()}
    controller.execute(Plan("switch", 3, dict(RANKS)))
    modules = dict(backend.model.named_modules())
    stored = {n: (modules[n].second.weight.full_tensor().detach().cpu(),
                  modules[n].first.weight.full_tensor().detach().cpu()) for n in RANKS}
    x = to_model_device(backend.model, next(batches)[0])[0]
    with torch.no_grad():
        out_dtype = str(backend.model(x).dtype)
    losses += _train(backend, controller, batches, 3)
    return {"masters": masters, "sranks": sranks, "stored": stored, "losses": losses, "out_dtype": out_dtype,
            "formats": _formats(controller), "timed": sorted(controller.events[-1].get("timing", {}))}


def ddp_case(rank: int, world: int) -> dict[str, Any]:
    """DDP with the forward under torch.autocast(bfloat16): fp32 parameters, bf16 compute."""
    from dist_lowrank.backends.ddp_backend import DDPBackend
    from dist_lowrank.plan import Plan
    from examples.common import digits, mlp

    backend = DDPBackend(mlp(), lambda p: torch.optim.AdamW(p, lr=1e-3))
    controller = _controller(backend)
    batches = digits(rank, world, batch=16, seed=1)
    losses = _train(backend, controller, batches, 3, autocast=torch.bfloat16)
    modules = dict(backend.unwrapped_model().named_modules())
    masters = {n: modules[n].weight.detach().double().cpu().clone() for n in RANKS}
    sranks = {n: r.value for n, r in controller.monitor.estimate(backend.shard_views(list(RANKS))).items()}
    controller.execute(Plan("switch", 3, dict(RANKS)))
    modules = dict(backend.unwrapped_model().named_modules())
    stored = {n: (modules[n].second.weight.detach().cpu().clone(), modules[n].first.weight.detach().cpu().clone())
              for n in RANKS}
    losses += _train(backend, controller, batches, 3, autocast=torch.bfloat16)
    return {"masters": masters, "sranks": sranks, "stored": stored, "losses": losses,
            "formats": _formats(controller), "timed": sorted(controller.events[-1].get("timing", {}))}


def fp16_supported() -> bool:
    """DeepSpeed refuses fp16 where its accelerator says the device has none (the CPU accelerator asks oneDNN,
    i.e. the host CPU's instruction set), so those scenarios run only on hosts that have it."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def all_precisions(rank: int, world: int) -> dict[str, Any]:
    """Every scenario in one pair of processes (the fp16 ones where DeepSpeed supports fp16 on this device)."""
    results = {"ds_bf16_z3": deepspeed_case(rank, world, 3, "bf16"),
               "ds_bf16_z2": deepspeed_case(rank, world, 2, "bf16"),
               "fsdp2_mp": fsdp2_case(rank, world), "ddp_autocast": ddp_case(rank, world)}
    if fp16_supported():
        results.update({"ds_fp16_z2": deepspeed_case(rank, world, 2, "fp16"),
                        "ds_fp16_z3": deepspeed_case(rank, world, 3, "fp16"), "example_ds_fp16": example_case()})
    return results


def example_case() -> dict[str, Any]:
    """The README example as a user runs it (DeepSpeed fp16, ZeRO-2, the switch decided by Cuttlefish)."""
    from examples.mixed_precision import main

    return main("ds_fp16", steps=30)
