"""Workers for the device-discipline check: every plugin path of one backend family under DeviceDiscipline.

Each run builds the model on the host, lets the backend put it on "its device" (cuda:LOCAL_RANK, virtual), then
runs: the monitor (init estimate), a training step, a forced switch (with layer profiling at the recorded
shapes), a step after it; an InRank model's spectrum, a growth past capacity and a step after it. What comes
back: the violations, how many ops were checked, and the switched layers' effective weights with the dense
weights they came from (the test compares them with torch.linalg.svd in plain torch, outside the mode).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

CUTTLEFISH = {"strategy": "cuttlefish", "target_modules": ["2", "4"], "monitor": {"method": "lanczos", "steps": 8},
              "switch": {"profile_layers": True, "profile_iters": 1, "min_speedup": 1e-6}}
INRANK = {"strategy": "inrank", "target_modules": ["2", "4"],
          "inrank": {"init_rank": 2, "warmup": 1, "gap": 1, "buffer": 2, "capacity_multiple": 4, "w0_mode": "frozen"}}
RANKS = {"2": 8, "4": 6}


def _step(backend, controller, batches) -> float:
    from examples.common import to_model_device

    x, y = to_model_device(backend.model, *next(batches))
    context = controller.record_shapes() if controller is not None else None
    if context is not None:
        with context:
            out = backend.model(x)
    else:
        out = backend.model(x)
    loss = F.cross_entropy(out.float(), y)
    backend.backward(loss)
    backend.step()
    return float(loss.detach())


def effective(backend) -> dict[str, torch.Tensor]:
    """Full dense weight (`second @ first`) of each switched layer, on every rank (collective)."""
    module = backend.unwrapped_model()
    out = {}
    for name in RANKS:
        layer = dict(module.named_modules())[name]
        a, b = gather(backend, layer.second.weight), gather(backend, layer.first.weight)
        out[name] = (a @ b).double()
    return out


def gather(backend, param: torch.Tensor) -> torch.Tensor:
    """Full fp32 tensor of a parameter: DTensor.full_tensor, DeepSpeed's fp32 master, or the tensor."""
    if hasattr(param, "full_tensor"):
        return param.full_tensor().detach().float().cpu()
    if hasattr(backend, "engine"):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).detach().float().cpu()
    return param.detach().float().cpu()


def check_family(make_backend: Callable[[torch.nn.Module, Any], Any], rank: int, world: int) -> dict:
    """Both halves (Cuttlefish switch, InRank growth) on one backend family, under DeviceDiscipline."""
    from dist_lowrank.config import config_from_dict
    from dist_lowrank.controller import LowRankController
    from dist_lowrank.methods.inrank.model import inrank_layers, to_inrank
    from dist_lowrank.methods.inrank.reshape import growth_change
    from dist_lowrank.plan import Plan
    from examples.common import digits, mlp
    from tests.device_discipline import DeviceDiscipline

    batches = digits(rank, world, batch=16)
    result: dict[str, Any] = {}
    # -- monitor, step, switch (profiled), step ---------------------------------------------------
    cfg = config_from_dict(CUTTLEFISH)
    with DeviceDiscipline() as check:
        backend = make_backend(mlp(), cfg)  # built on the host inside the check: the backend must move it
        controller = LowRankController(backend, cfg)
        controller.start()
        losses = [_step(backend, controller, batches)]
        dense = {n: gather(backend, dict(backend.unwrapped_model().named_modules())[n].weight).double()
                 for n in RANKS}
        controller.execute(Plan("switch", 1, dict(RANKS)))
        result["effective"] = effective(backend)
        losses.append(_step(backend, controller, batches))
    result.update(switch_violations=check.report(), switch_ops=check.ops, dense=dense, losses=losses,
                  timing=controller.events[-1].get("timing", {}))
    # -- InRank: spectrum, growth past capacity, step ------------------------------------------------
    cfg = config_from_dict(INRANK)
    with DeviceDiscipline() as check:
        backend = make_backend(to_inrank(mlp(), cfg), cfg)
        controller = LowRankController(backend, cfg)
        svals = controller.method.spectrum(1, controller.probe)
        layers = inrank_layers(backend.unwrapped_model())
        caps = {n: m.capacity * 2 for n, m in layers.items()}
        widths = {n: m.rank + 1 for n, m in layers.items()}
        backend.apply(growth_change(backend.unwrapped_model(), widths, caps, 1))
        svals_after = controller.method.spectrum(2, controller.probe)
        losses = [_step(backend, None, batches)]
    result.update(grow_violations=check.report(), grow_ops=check.ops, inrank_losses=losses,
                  svals={n: v.tolist() for n, v in svals.items()},
                  capacities={n: m.capacity for n, m in inrank_layers(backend.unwrapped_model()).items()},
                  svals_after={n: v.tolist() for n, v in svals_after.items()})
    return result


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-3)


def ddp_family(rank: int, world: int) -> dict:
    from dist_lowrank.backends.ddp_backend import DDPBackend

    return check_family(lambda model, cfg: DDPBackend(model, _adamw), rank, world)


def local_family(rank: int, world: int) -> dict:
    """One process, no process group: the user moves the model (LocalBackend takes it as given)."""
    from dist_lowrank.backends.local_backend import LocalBackend
    from dist_lowrank.device import default_device

    return check_family(lambda model, cfg: LocalBackend(model.to(default_device()), _adamw), rank, world)


def fsdp2_family(rank: int, world: int) -> dict:
    from dist_lowrank.backends.fsdp2_backend import FSDP2Backend, shard_each_layer

    def make(model, cfg):
        built = [model]

        def model_fn():  # the first call returns the model given; rebuilds (on meta) build the same structure
            if built:
                return built.pop()
            from dist_lowrank.methods.inrank.model import to_inrank
            from examples.common import mlp

            return to_inrank(mlp(), cfg) if cfg.strategy == "inrank" else mlp()
        return FSDP2Backend(model_fn, shard_each_layer, _adamw)
    return check_family(make, rank, world)


def deepspeed_family(rank: int, world: int) -> dict:
    """ZeRO-1, 2 and 3 one after the other in the same processes (one DeepSpeed import)."""
    from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend

    out = {}
    for stage in (1, 2, 3):
        config = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                  "steps_per_print": 10**9}
        out[stage] = check_family(lambda model, cfg: DeepSpeedBackend(model, config, _adamw), rank, world)
    return out
