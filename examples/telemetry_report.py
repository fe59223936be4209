"""Telemetry from your own script: a `lowrank.logging` section, and the loop stays as it was.

    deepspeed --num_gpus 2 examples/telemetry_report.py --api deepspeed --out runs/tele_ds   (DS_ACCELERATOR=cpu on CPU)
    torchrun --nproc_per_node 2 examples/telemetry_report.py --api fsdp2 --out runs/tele_fsdp2
    dist-lowrank report runs/tele_ds        # the same report, events.jsonl and TensorBoard tags as the CLI

`engine.step()` (DeepSpeed) or `controller.after_step(step, loss)` (attach) records each optimizer step:
bytes sent by op beside the analytic model, samples/s (DeepSpeed: its train_batch_size; attach: set
`lowrank.logging.samples_per_step`), tokens/s (`tokens_per_sample`), stable ranks, ranks and the switch's
cost. `close()` logs the last partial window and writes the report; without it the report is written at exit.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import argparse
import copy

import torch
import torch.nn.functional as F

from examples.common import LOWRANK, digits, mlp, to_model_device

BATCH = 32  # per rank


def lowrank_section(out_dir: str, samples_per_step: int | None = None) -> dict:
    section = copy.deepcopy(LOWRANK)
    section["cuttlefish"].update({"min_switch_step": 10, "max_switch_step": 20})
    section["logging"] = {"out_dir": out_dir, "log_every": 5, "tokens_per_sample": 64,  # 8×8 pixels
                          **({"samples_per_step": samples_per_step} if samples_per_step else {})}
    return section


def deepspeed_main(out_dir: str, steps: int = 40, stage: int = 2) -> dict:
    import torch.distributed as dist

    import dist_lowrank.deepspeed_api as lowrank_ds

    model = mlp()
    ds_config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                 "steps_per_print": 10**9, "lowrank": lowrank_section(out_dir)}
    engine, _, _, _ = lowrank_ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=2e-3),
                                            config=ds_config)
    batches = digits(dist.get_rank(), dist.get_world_size(), batch=BATCH)
    for _ in range(steps):
        x, y = to_model_device(engine, *next(batches))
        loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()               # the switch and the telemetry happen in here
    return engine.close()           # optional: the last partial window, summary.json and the report


def fsdp2_main(out_dir: str, steps: int = 40) -> dict:
    import torch.distributed as dist

    from dist_lowrank import attach
    from dist_lowrank.backends.fsdp2_backend import FSDP2Backend
    from examples.fsdp2_cuttlefish import shard

    world = dist.get_world_size()
    backend = FSDP2Backend(mlp, shard, lambda params: torch.optim.AdamW(params, lr=2e-3))
    controller = attach(backend, lowrank_section(out_dir, samples_per_step=BATCH * world))
    batches = digits(dist.get_rank(), world, batch=BATCH)
    for step in range(1, steps + 1):
        x, y = to_model_device(backend.model, *next(batches))
        loss = F.cross_entropy(backend.model(x), y)
        backend.backward(loss)
        backend.step()
        controller.after_step(step, float(loss.detach()))  # the switch and the telemetry happen in here
    return controller.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--api", choices=["deepspeed", "fsdp2"], default="deepspeed")
    parser.add_argument("--out", default="runs/telemetry")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    import torch.distributed as dist

    if args.api == "fsdp2":
        from dist_lowrank.device import before_process_group, default_dist_backend

        before_process_group()  # this rank's GPU bound, torch._dynamo imported: before the process group
        dist.init_process_group(default_dist_backend())
        summary = fsdp2_main(args.out, args.steps)
    else:
        summary = deepspeed_main(args.out, args.steps)
    if dist.get_rank() == 0:
        print(f"switched at step {summary['switch_step']}; trainable parameters {summary['trainable_params_full']:,} "
              f"-> {summary['trainable_params_final']:,}; report: {args.out}/report.md")
    from dist_lowrank.device import end_process_group

    end_process_group()  # engines freed while the group is up, then the group
