"""Tiny shared pieces of the examples: sklearn's digits (ships with scikit-learn) and an MLP."""
from __future__ import annotations

import torch
from torch import nn


def digits(rank: int = 0, world: int = 1, batch: int = 32, seed: int = 0):
    """Endless per-rank batches of the 8×8 digits (real data, offline); rank r takes its slice."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    epoch = 0
    while True:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(x) - batch * world + 1, batch * world):
            idx = order[start + rank * batch: start + (rank + 1) * batch]
            yield x[idx], y[idx]
        epoch += 1


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128),
                         nn.ReLU(), nn.Linear(128, 10))


LOWRANK = {"strategy": "cuttlefish", "target_modules": ["2", "4"],
           "monitor": {"cadence_steps": 5}, "cuttlefish": {"ema_window": 3, "last_k": 3, "threshold": 0.5,
                                                           "min_switch_step": 20, "max_switch_step": 40},
           "switch": {"profile_layers": False}}


def train(backend, controller, steps: int = 60, batch: int = 32) -> dict:
    """The loop an FSDP2/DDP user writes: step the backend, then tell the controller (it may reshard,
    so `backend.model` is read again every step)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batches = digits(rank, world, batch=batch)
    losses = []
    for step in range(1, steps + 1):
        x, y = to_model_device(backend.model, *next(batches))  # data is made on the host; the model may be on a GPU
        loss = F.cross_entropy(backend.model(x), y)
        backend.backward(loss)
        backend.step()
        controller.after_step(step, float(loss.detach()))
        losses.append(float(loss.detach()))
    switch = [e for e in controller.events if e["event"] == "switch"]
    return {"losses": losses, "switch_step": switch[0]["step"] if switch else None,
            "ranks": switch[0]["ranks"] if switch else {}}


def to_model_device(model: nn.Module, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors moved to the device the model computes on (CUDA:LOCAL_RANK on GPUs)."""
    from dist_lowrank.device import module_device, to_device

    return to_device(tensors, module_device(model))


def run_as_script(main) -> None:
    """torchrun entry: bind this rank's GPU (LOCAL_RANK) first, join the process group (nccl on GPUs, gloo on
    CPU), run, report on rank 0."""
    import torch.distributed as dist

    from dist_lowrank.device import before_process_group, default_dist_backend

    before_process_group()
    dist.init_process_group(default_dist_backend())
    result = main()
    if dist.get_rank() == 0:
        print(f"switched at step {result['switch_step']} to ranks {result['ranks']}; "
              f"loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}")
    from dist_lowrank.device import end_process_group

    end_process_group()  # engines freed while the group is up, then the group
