"""Mixed precision + Cuttlefish: DeepSpeed bf16 / fp16 (dynamic loss scale), FSDP2 MixedPrecisionPolicy, DDP autocast.

    deepspeed --num_gpus 2 examples/mixed_precision.py --mode ds_fp16        (DS_ACCELERATOR=cpu on CPU)
    torchrun --nproc_per_node 2 examples/mixed_precision.py --mode fsdp2_bf16
    torchrun --nproc_per_node 2 examples/mixed_precision.py --mode ddp_autocast

Nothing precision-specific is passed to the plugin: it reads DeepSpeed's fp32 masters for stable ranks and
SVDs, writes the factors back in the training dtype, carries the fp16 loss scale across the engine rebuild,
and times layers in the dtype (and autocast) the forward ran with.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from examples.common import LOWRANK, digits, mlp, to_model_device

MODES = ("ds_bf16", "ds_fp16", "fsdp2_bf16", "ddp_autocast")


def ds_config(precision: str, stage: int = 2, lowrank: dict | None = None) -> dict:
    """A ds_config with bf16, or fp16 and its dynamic loss scale (DeepSpeed's own keys)."""
    section = {"enabled": True} if precision == "bf16" else {
        "enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "steps_per_print": 10**9, precision: section, **({"lowrank": lowrank} if lowrank else {})}


def shard_bf16(model: nn.Module) -> nn.Module:
    """The user's FSDP2 sharding function: bf16 compute, fp32 gradient reduction, fp32 sharded parameters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def main(mode: str = "ds_fp16", steps: int = 40, stage: int = 2) -> dict:
    import torch.distributed as dist

    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}; allowed: {', '.join(MODES)}")
    lowrank = {**LOWRANK, "cuttlefish": {**LOWRANK["cuttlefish"], "min_switch_step": 15, "max_switch_step": 25}}
    dtype, autocast = None, None
    if mode.startswith("ds_"):
        import dist_lowrank.deepspeed_api as lowrank_ds

        model = mlp()
        precision = mode[3:]
        engine, _, _, _ = lowrank_ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=2e-3),
                                                config=ds_config(precision, stage, lowrank))
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16   # DeepSpeed wants inputs in its dtype
        step_model, controller = engine, None
    else:
        from dist_lowrank import attach

        if mode == "fsdp2_bf16":
            from dist_lowrank.backends.fsdp2_backend import FSDP2Backend

            backend = FSDP2Backend(mlp, shard_bf16, lambda params: torch.optim.AdamW(params, lr=2e-3))
        else:
            from dist_lowrank.backends.ddp_backend import DDPBackend

            backend = DDPBackend(mlp(), lambda params: torch.optim.AdamW(params, lr=2e-3))
            autocast = torch.bfloat16
        controller = attach(backend, lowrank)
        step_model = backend
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batches = digits(rank, world)
    losses = []
    for step in range(1, steps + 1):
        model = step_model if controller is None else step_model.model   # backend.model changes at a switch
        x, y = to_model_device(model, *next(batches))
        x = x.to(dtype) if dtype is not None else x
        with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        step_model.backward(loss)
        step_model.step()                                 # DeepSpeed: the switch happens in here when due
        if controller is not None:
            controller.after_step(step, float(loss.detach()))
        losses.append(float(loss.detach()))
    events = (engine.controller if controller is None else controller).events
    switch = [e for e in events if e["event"] == "switch"]
    result = {"losses": losses, "switch_step": switch[0]["step"] if switch else None,
              "ranks": switch[0]["ranks"] if switch else {}}
    if controller is None:
        result["skipped_steps"] = engine.skipped_steps
        result["loss_scale"] = float(engine.optimizer.loss_scaler.cur_scale)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=MODES, default="ds_fp16")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    if not args.mode.startswith("ds_"):
        import torch.distributed as dist

        from dist_lowrank.device import before_process_group, default_dist_backend

        before_process_group()
        dist.init_process_group(default_dist_backend())
    result = main(args.mode, args.steps, args.stage)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"{args.mode}: switched at step {result['switch_step']} to ranks {result['ranks']}; "
              f"loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}")
    from dist_lowrank.device import end_process_group

    end_process_group()  # engines freed while the group is up, then the group
