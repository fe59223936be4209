"""Shrink (a factorized layer's rank going down) through the one reshape pipeline, on every engine: the kept
components' values and Adam moments are the old ones sliced, steps kept, every other parameter's state bit for
bit, and the next step equals a plain torch.optim.AdamW step on the sliced tensors, computed here."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.dist_harness import run_ranks
from tests.distributed.shrink_workers import KEEP, MOMENTS, POST, SHRUNK, shrink_worker
from tests.distributed.switch_common import PLAN_RANKS, PRE_STEPS, global_batch

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]


class Pair(nn.Module):
    """second(first(x)) in plain torch (the reference for a factorized layer)."""

    def __init__(self, n: int, r: int, m: int) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(n, r, bias=False), nn.Linear(r, m)

    def forward(self, x):
        return self.second(self.first(x))


def sliced(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if name == f"{SHRUNK}.first.weight":
        return tensor[:KEEP]
    if name == f"{SHRUNK}.second.weight":
        return tensor[:, :KEEP]
    return tensor


def expected_step(name: str) -> float:
    """Adam steps each parameter has taken before the shrink: factors since the switch, the rest since the start."""
    return float(POST if name.split(".")[1] in {n.split(".")[1] for n in PLAN_RANKS} else PRE_STEPS + POST)


def reference_next_step(before: dict) -> dict[str, torch.Tensor]:
    """One plain AdamW step of the shrunk model on the whole global batch, from the sliced values and moments."""
    net = nn.Sequential(nn.Linear(12, 48), nn.Tanh(), Pair(48, KEEP, 40), nn.Tanh(), Pair(40, PLAN_RANKS["net.4"], 36),
                        nn.Tanh(), nn.Linear(36, 3))
    model = nn.Module()
    model.net = net
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(sliced(name, before[name]["value"]))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.01)
    for name, param in named.items():
        opt.state[param] = {"step": torch.tensor(expected_step(name)),
                            **{k: sliced(name, before[name][k]).clone() for k in MOMENTS}}
    x, y = global_batch(PRE_STEPS + POST)
    F.cross_entropy(model.net(x), y).backward()
    opt.step()
    return {n: p.detach().clone() for n, p in named.items()}


@pytest.mark.parametrize("kind, world", [("local", 1), ("ddp", 2), ("fsdp2", 2), ("zero2", 2), ("zero3", 2)])
def test_shrink_slices_state_and_trains_like_plain_adamw(kind, world):
    ranks = run_ranks(shrink_worker, world=world, timeout=240, args=(kind,))
    r0 = ranks[0]
    before, after = r0["before"], r0["after"]
    assert r0["rank"] == KEEP and r0["params_before"] - r0["params_after"] == (6 - KEEP) * (48 + 40)
    assert set(after) == set(before)
    for name, entry in after.items():
        for key in ("value", *MOMENTS):
            assert torch.equal(entry[key], sliced(name, before[name][key])), (name, key)
        if "step" in before[name]:  # torch optimizers keep a step per parameter
            assert float(before[name]["step"]) == expected_step(name) and torch.equal(entry["step"], before[name]["step"])
    reference = reference_next_step(before)
    for r in ranks:
        for name, tensor in reference.items():
            assert torch.allclose(r["final"][name]["value"], tensor, atol=1e-5, rtol=1e-5), (kind, name)
