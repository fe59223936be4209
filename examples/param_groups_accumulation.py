"""Decay / no-decay param groups, a LambdaLR *instance* and gradient accumulation 2, through a switch.

    torchrun --nproc_per_node 2 examples/param_groups_accumulation.py --backend ddp        (or fsdp2)
    deepspeed --num_gpus 2 examples/param_groups_accumulation.py --backend zero2           (zero1, zero3)

Each group keeps its lr, weight_decay, betas and the extra key "tag" through the switch; a factor joins the
group of the weight it replaces (DeepSpeed: a companion group with the same hyper-parameters, so its Adam
step starts at 0); the scheduler you built is the one that keeps running, at its position. With gradient
accumulation the plugin decides only at optimizer steps: DeepSpeed counts micro-steps itself
(`gradient_accumulation_steps` in the ds_config); with DDP / FSDP2 your loop skips the gradient all-reduce
on all but the last micro-batch and calls `backend.step()` and `controller.after_step()` once per step.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from examples.common import digits, mlp, to_model_device

ACCUM, MICRO = 2, 16  # per rank and optimizer step: 2 micro-batches of 16 samples
LOWRANK = {"strategy": "fixed", "target_modules": ["2", "4"], "fixed": {"ratio": 0.125, "warmup_steps": 6},
           "monitor": {"cadence_steps": 3}, "switch": {"profile_layers": False}}
GROUPS = {"decay": {"lr": 2e-3, "weight_decay": 0.1, "betas": (0.9, 0.99)},
          "no_decay": {"lr": 1e-3, "weight_decay": 0.0, "betas": (0.8, 0.999)}}


def lr_decay(step: int) -> float:
    """The weights' schedule (LambdaLR multiplier after `step` scheduler steps)."""
    return 0.95 ** step


def lr_inverse(step: int) -> float:
    """The biases' schedule."""
    return 1.0 / (1.0 + 0.1 * step)


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weights decay, biases do not; "tag" is an extra key of our own (it travels with the group)."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not n.endswith("bias")], "tag": "decay", **GROUPS["decay"]},
            {"params": [p for n, p in named if n.endswith("bias")], "tag": "no_decay", **GROUPS["no_decay"]}]


def optimizer_and_scheduler(model: nn.Module):
    optimizer = torch.optim.AdamW(param_groups(model))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, [lr_decay, lr_inverse])


def ds_config(stage: int, micro: int = MICRO, accum: int = ACCUM) -> dict:
    """The DeepSpeed side: accumulation is DeepSpeed's own (`gradient_accumulation_steps`)."""
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**9}


@contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """All-reduce gradients in this backward only if `enabled` (the last micro-batch): DDP's no_sync, FSDP2's
    set_requires_gradient_sync."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        yield
    elif not enabled and hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:
        yield


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(p.requires_grad for p in layer.parameters()):
            fully_shard(layer)
    return fully_shard(model)


def main(backend: str = "ddp", steps: int = 12, inspect: Optional[Callable[..., Any]] = None) -> dict:
    """Train `steps` optimizer steps on this rank's share of the digits; `inspect(engine_or_backend, scheduler)`
    (for the tests) is called at the end and its result returned under "inspect"."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    batches = digits(rank, world, batch=ACCUM * MICRO)
    if backend.startswith("zero"):
        import dist_lowrank.deepspeed_api as lowrank_ds

        model = mlp()
        optimizer, scheduler = optimizer_and_scheduler(model)
        engine, _, _, returned = lowrank_ds.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                       config={**ds_config(int(backend[-1])), "lowrank": LOWRANK})
        assert returned is scheduler  # the instance you passed is the one DeepSpeed steps, from the first step
        losses = []
        for _ in range(steps):
            x, y = to_model_device(engine, *next(batches))
            micro = []
            for xm, ym in zip(x.chunk(ACCUM), y.chunk(ACCUM)):  # DeepSpeed steps the optimizer every ACCUM calls
                loss = F.cross_entropy(engine(xm), ym)
                engine.backward(loss)
                engine.step()
                micro.append(float(loss.detach()))
            losses.append(sum(micro) / len(micro))
        events, handle = engine.controller.events, engine
    else:
        from dist_lowrank import attach
        from dist_lowrank.backends.ddp_backend import DDPBackend
        from dist_lowrank.backends.fsdp2_backend import FSDP2Backend

        if backend == "fsdp2":
            model = shard(mlp())
            optimizer, scheduler = optimizer_and_scheduler(model)  # over the shards
            handle = FSDP2Backend(mlp, shard, optimizer, scheduler, model=model)
        else:
            model = mlp()
            optimizer, scheduler = optimizer_and_scheduler(model)
            handle = DDPBackend(model, optimizer, scheduler)
        controller = attach(handle, LOWRANK)
        losses = []
        for step in range(1, steps + 1):
            x, y = to_model_device(handle.model, *next(batches))
            micro = []
            for i, (xm, ym) in enumerate(zip(x.chunk(ACCUM), y.chunk(ACCUM))):
                with grad_sync(handle.model, enabled=i == ACCUM - 1):
                    loss = F.cross_entropy(handle.model(xm), ym)
                    handle.backward(loss / ACCUM)
                micro.append(float(loss.detach()))
            handle.step()                                   # once per optimizer step (scheduler steps here)
            losses.append(sum(micro) / len(micro))
            controller.after_step(step, losses[-1])         # decisions only at optimizer-step boundaries
        events = controller.events
    switch = [e for e in events if e["event"] == "switch"]
    return {"losses": losses, "switch_step": switch[0]["step"] if switch else None,
            "ranks": switch[0]["ranks"] if switch else {},
            "inspect": inspect(handle, scheduler) if inspect else None}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="ddp", choices=["ddp", "fsdp2", "zero1", "zero2", "zero3"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    import torch.distributed as dist

    if args.backend.startswith("zero"):
        result = main(args.backend, args.steps)
    else:
        from dist_lowrank.device import before_process_group, default_dist_backend

        before_process_group()
        dist.init_process_group(default_dist_backend())
        result = main(args.backend, args.steps)
    if dist.get_rank() == 0:
        print(f"switched at step {result['switch_step']} to ranks {result['ranks']}; "
              f"loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}")
    from dist_lowrank.device import end_process_group

    end_process_group()  # engines freed while the group is up, then the group
