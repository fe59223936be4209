"""DDP + Cuttlefish: the backend owns the DDP wrapper; call `controller.after_step` per step.

    torchrun --nproc_per_node 2 examples/ddp_cuttlefish.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_lowrank import attach
from dist_lowrank.backends.ddp_backend import DDPBackend
from examples.common import LOWRANK, digits, mlp


def main(steps: int = 60, lowrank: dict | None = None) -> dict:
    import torch.distributed as dist

    backend = DDPBackend(mlp(), lambda params: torch.optim.AdamW(params, lr=2e-3))
    controller = attach(backend, lowrank or LOWRANK)
    batches = digits(dist.get_rank(), dist.get_world_size())
    losses = []
    for step in range(1, steps + 1):
        x, y = next(batches)
        loss = F.cross_entropy(backend.model(x), y)
        backend.backward(loss)
        backend.step()
        controller.after_step(step, float(loss.detach()))
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
