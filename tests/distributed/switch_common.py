"""Shared model, data and single-process reference for the backend switch tests."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from dist_lowrank.reshape.builders import switch_change

PLAN_RANKS = {"net.2": 6, "net.4": 5}
UNTOUCHED = ["net.0.weight", "net.0.bias", "net.6.weight", "net.6.bias"]
PRE_STEPS, POST_STEPS, GLOBAL_BATCH = 3, 5, 32


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 48), nn.Tanh(), nn.Linear(48, 40), nn.Tanh(), nn.Linear(40, 36),
                                 nn.Tanh(), nn.Linear(36, 3))

    def forward(self, x):
        return self.net(x)


def make_model() -> MLP:
    torch.manual_seed(0)
    return MLP()


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 12, generator=gen)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()


def local_batch(step: int, rank: int, world: int):
    x, y = global_batch(step)
    per = GLOBAL_BATCH // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def fixed_input() -> torch.Tensor:
    return torch.randn(7, 12, generator=torch.Generator().manual_seed(7))


def optimizer_factory(params):
    return torch.optim.AdamW(params, lr=5e-3, weight_decay=0.01)


def scheduler_factory(optimizer):
    """Decaying LR: its position must survive the rebuild (checked through the final weights)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lr_decay)


def lr_decay(step: int) -> float:
    return 0.8 ** step


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def train_after_switch(backend, rank: int, world: int) -> list[float]:
    """The POST_STEPS training steps every backend worker runs after the switch; returns the losses."""
    losses = []
    for step in range(PRE_STEPS, PRE_STEPS + POST_STEPS):
        loss = loss_fn(backend.model, local_batch(step, rank, world))
        losses.append(float(loss.detach()))
        backend.backward(loss)
        backend.step()
    return losses


def reference_run():
    """Single process, whole global batch: pre-steps, switch, post-steps. Returns what the tests compare."""
    from dist_lowrank.backends.local_backend import LocalBackend
    backend = LocalBackend(make_model(), optimizer_factory, scheduler_factory)
    for step in range(PRE_STEPS):
        backend.backward(loss_fn(backend.model, global_batch(step)))
        backend.step()
    full_before = {n: p.detach().clone() for n, p in backend.module.named_parameters()}
    backend.apply(switch_change(backend.unwrapped_model(), dict(PLAN_RANKS), PRE_STEPS))
    with torch.no_grad():
        out_after_switch = backend.model(fixed_input()).clone()
    losses = train_after_switch(backend, 0, 1)
    final = {n: p.detach().clone() for n, p in backend.module.named_parameters()}
    return {"full_before": full_before, "out_after_switch": out_after_switch, "losses": losses, "final": final}


def factorized_reference_output(full_weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The gathered pre-switch weights, factorized in one process with apply_rank_plan."""
    from dist_lowrank.surgery import apply_rank_plan

    model = make_model()
    model.load_state_dict(full_weights)
    apply_rank_plan(model, dict(PLAN_RANKS))
    with torch.no_grad():
        return model(fixed_input())


def state_copy(state: dict) -> dict:
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in state.items()}


def exact_srank(weight: torch.Tensor) -> float:
    s = torch.linalg.svdvals(weight.double().reshape(weight.shape[0], -1))
    return float((s ** 2).sum() / s[0] ** 2)


def monitor_bytes(dims: list[tuple[int, int]], cut: list[bool], steps: int = 20) -> int:
    """Bytes the sharded monitor sends: one (norm, non-finite, cut-row) table, then per Lanczos step an
    n-vector for whole-row layers (WᵀW) or an m- and an n-vector for layers a partition cuts (fp64)."""
    per_step = sum((m + n) if c else n for (m, n), c in zip(dims, cut))
    return 8 * (3 * len(dims) + steps * per_step)


def zero3_cuts_rows(m: int, n: int, world: int = 2) -> bool:
    """ZeRO-3 gives each rank ceil(m·n / world) flat elements: a boundary inside a row cuts it."""
    chunk = -(-m * n // world)
    return any(0 < r * chunk < m * n and (r * chunk) % n for r in range(1, world))


def assert_estimates(results: list[dict], full_weights: dict, sharded: bool, layout: str = "rows") -> None:
    """Estimates identical on every rank, within 1% of exact; sharded bytes O(Σ(m+n)), not O(Σ mn)."""
    assert results[0]["estimates"] == results[1]["estimates"]
    for name, value in results[0]["estimates"].items():
        exact = exact_srank(full_weights[f"{name}.weight"])
        assert abs(value - exact) / exact < 0.01, (name, value, exact)
    dims = [tuple(full_weights[f"{n}.weight"].shape) for n in results[0]["estimates"]]
    if sharded:
        cut = [layout == "flat" and zero3_cuts_rows(m, n) for m, n in dims]
        assert results[0]["monitor_bytes"] == monitor_bytes(dims, cut)
