"""FSDP2 (`fully_shard`) + Cuttlefish: build with a model function and a sharding function, then call
`controller.after_step` once per optimizer step.

    torchrun --nproc_per_node 2 examples/fsdp2_cuttlefish.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_lowrank import attach
from dist_lowrank.backends.fsdp2_backend import FSDP2Backend
from examples.common import LOWRANK, digits, mlp


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(p.requires_grad for p in layer.parameters()):
            fully_shard(layer)
    return fully_shard(model)


def main(steps: int = 60, lowrank: dict | None = None) -> dict:
    import torch.distributed as dist

    backend = FSDP2Backend(mlp, shard, lambda params: torch.optim.AdamW(params, lr=2e-3))
    controller = attach(backend, lowrank or LOWRANK)
    batches = digits(dist.get_rank(), dist.get_world_size())
    losses = []
    for step in range(1, steps + 1):
        x, y = next(batches)
        loss = F.cross_entropy(backend.model(x), y)   # backend.model is the current sharded model
        backend.backward(loss)
        backend.step()
        controller.after_step(step, float(loss.detach()))   # may reshard: re-read backend.model next step
        losses.append(float(loss.detach()))
    switch = [e for e in controller.events if e["event"] == "switch"]
    return {"losses": losses, "switch_step": switch[0]["step"] if switch else None,
            "ranks": switch[0]["ranks"] if switch else {}}


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    result = main()
    if dist.get_rank() == 0:
        print(f"switched at step {result['switch_step']} to ranks {result['ranks']}")
    dist.destroy_process_group()
