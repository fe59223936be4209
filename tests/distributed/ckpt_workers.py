"""Rank functions for the fault tests (importable by spawned processes)."""
from __future__ import annotations

from tests.distributed.ckpt_common import CKPT, CONFIG


def train_worker(rank: int, world: int, overrides: list[str]) -> dict:
    """The tiny GPT job through dist_lowrank.train.loop.train in an already initialized process group."""
    from dist_lowrank.train.config_file import load_train_config
    from dist_lowrank.train.loop import train

    return train(*load_train_config(CONFIG, CKPT + overrides))


def nonfinite_at_switch_worker(rank: int, world: int, nan_rank: int) -> dict:
    """DDP + controller: the switch is due at step 6, but rank `nan_rank` sees a NaN loss at step 6
    (world 1: the only rank does). Returns the switch step, ranks and the strategy's history lengths."""
    import torch
    from torch import nn

    from dist_lowrank.backends.ddp_backend import DDPBackend
    from dist_lowrank.backends.local_backend import LocalBackend
    from dist_lowrank.config import config_from_dict
    from dist_lowrank.controller import LowRankController

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    factory = lambda p: torch.optim.SGD(p, lr=0.01)  # noqa: E731
    backend = DDPBackend(model, factory) if world > 1 else LocalBackend(model, factory)
    cfg = config_from_dict({"target_modules": ["2", "4"], "monitor": {"cadence_steps": 2},
                            "cuttlefish": {"min_switch_step": 6, "max_switch_step": 6, "rank_rule": "raw"},
                            "switch": {"profile_layers": False}})
    controller = LowRankController(backend, cfg)
    controller.start()
    switch = None
    for step in range(1, 11):
        loss = float("nan") if step == 6 and rank == nan_rank else 1.0
        plan = controller.after_step(step, loss)
        if plan is not None and switch is None:
            switch = step
    return {"switch": switch, "ranks": dict(controller.ranks), "skipped": controller.skipped_steps,
            "estimates": [e["step"] for e in controller.events if e["event"] == "estimate"]}
