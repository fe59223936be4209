"""DeepSpeed ZeRO + Cuttlefish: the user's loop is unchanged; only `deepspeed.initialize` changes.

    deepspeed --num_gpus 2 examples/deepspeed_cuttlefish.py --stage 3      (DS_ACCELERATOR=cpu on CPU)
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import argparse

import torch
import torch.nn.functional as F

import dist_lowrank.deepspeed_api as lowrank_ds
from examples.common import LOWRANK, digits, mlp, to_model_device


def main(stage: int = 2, steps: int = 60, world: int | None = None, lowrank: dict | None = None) -> dict:
    import torch.distributed as dist

    model = mlp()
    ds_config = {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                 "steps_per_print": 10**9, "lowrank": lowrank or LOWRANK}
    # The one changed call (was: deepspeed.initialize):
    engine, _, _, _ = lowrank_ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=2e-3),
                                            config=ds_config)
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = digits(rank, world)
    losses = []
    for _ in range(steps):
        x, y = to_model_device(engine, *next(batches))  # the engine's device (cuda:LOCAL_RANK on GPUs)
        loss = F.cross_entropy(engine(x), y)          # unchanged
        engine.backward(loss)                         # unchanged
        engine.step()                                 # unchanged: the switch happens in here
        losses.append(float(loss.detach()))
    events = engine.controller.events if engine.controller else []
    switch = [e for e in events if e["event"] == "switch"]
    return {"losses": losses, "switch_step": switch[0]["step"] if switch else None,
            "ranks": switch[0]["ranks"] if switch else {},
            "sranks": [e["sranks"] for e in events if e["event"] == "estimate"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    result = main(args.stage, args.steps)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"switched at step {result['switch_step']} to ranks {result['ranks']}; "
              f"loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}")
