"""Param groups and a scheduler through a switch and a resume, in one process (LocalBackend: DDP's code path).

The resumed backend is built from the checkpoint manifest's group layout (`engine_meta()["param_groups"]`) on a
model given the saved layout; its groups, lr schedule and the next losses must equal the uninterrupted run's.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_lowrank.reshape.builders import switch_change

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


def _run(tmp_path, resume_at=None):
    from dist_lowrank.backends.local_backend import LocalBackend
    from dist_lowrank.checkpoint.manifest import apply_layout, layout_of
    from examples.common import mlp
    from examples.param_groups_accumulation import lr_decay, lr_inverse, optimizer_and_scheduler

    torch.manual_seed(0)
    data = [(torch.rand(16, 64), torch.randint(0, 10, (16,))) for _ in range(8)]
    model = mlp()
    backend = LocalBackend(model, *optimizer_and_scheduler(model))
    losses = []
    for step, (x, y) in enumerate(data, 1):
        loss = F.cross_entropy(backend.model(x), y)
        backend.backward(loss)
        backend.step()
        losses.append(float(loss.detach()))
        if step == 3:
            backend.apply(switch_change(backend.unwrapped_model(), {"2": 16, "4": 8}, 3))
        if step == resume_at:
            meta, layout = backend.engine_meta(), layout_of(backend.module)
            backend.save_state(tmp_path, "{}")
            fresh = apply_layout(mlp(), layout)
            backend = LocalBackend(fresh, lambda params: torch.optim.AdamW(params),
                                   lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, [lr_decay, lr_inverse]),
                                   param_groups=meta["param_groups"])
            backend.load_state(tmp_path, meta)
    names = {id(p): n for n, p in backend.module.named_parameters()}
    groups = {names[id(p)]: (g["lr"], g["weight_decay"], g["betas"], g["tag"])
              for g in backend.optimizer.param_groups for p in g["params"]}
    return losses, groups, backend.scheduler.last_epoch


def test_groups_and_schedule_survive_a_resume_after_the_switch(tmp_path):
    losses, groups, epoch = _run(tmp_path)
    resumed_losses, resumed_groups, resumed_epoch = _run(tmp_path, resume_at=5)
    assert resumed_groups == groups and epoch == resumed_epoch == 8
    assert groups["2.first.weight"][1:] == (0.1, (0.9, 0.99), "decay")
    assert groups["2.second.bias"][1:] == (0.0, (0.8, 0.999), "no_decay")
    assert resumed_losses == losses  # bit for bit: same process, same state
