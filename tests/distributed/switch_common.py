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


def train_steps(backend, steps, rank: int, world: int) -> list[float]:
    """Training steps `steps` (global step numbers: the batches) on this rank's share; returns the losses."""
    losses = []
    for step in steps:
        loss = loss_fn(backend.model, local_batch(step, rank, world))
        losses.append(float(loss.detach()))
        backend.backward(loss)
        backend.step()
    return losses


def train_after_switch(backend, rank: int, world: int) -> list[float]:
    """The POST_STEPS training steps every backend worker runs after the switch; returns the losses."""
    return train_steps(backend, range(PRE_STEPS, PRE_STEPS + POST_STEPS), rank, world)


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


def plain_torch_switch() -> dict:
    """An oracle that shares no code with the plugin: the dense MLP trained in plain torch (AdamW, LambdaLR, the
    global batches) to the switch, its Adam state, and the switched model's output computed with
    torch.linalg.svd and the documented split (A = U√Σ, B = √ΣVᵀ at the plan's rank, each component's sign chosen
    so the largest-|·| entry of U's column is positive; the layer computes x Bᵀ Aᵀ + b)."""
    model = make_model()
    optimizer = optimizer_factory(model.parameters())
    scheduler = scheduler_factory(optimizer)
    for step in range(PRE_STEPS):
        optimizer.zero_grad()
        loss_fn(model, global_batch(step)).backward()
        optimizer.step()
        scheduler.step()
    params = dict(model.named_parameters())
    state = {n: {k: optimizer.state[params[n]][k].detach().clone() for k in ("exp_avg", "exp_avg_sq")}
             for n in UNTOUCHED}
    h = fixed_input()
    with torch.no_grad():
        for index, layer in enumerate(model.net):
            name = f"net.{index}"
            if name in PLAN_RANKS:
                r = PLAN_RANKS[name]
                u, sigma, vh = torch.linalg.svd(layer.weight.double(), full_matrices=False)
                u, sigma, vh = u[:, :r], sigma[:r], vh[:r]
                signs = torch.sign(u[u.abs().argmax(0), torch.arange(r)])
                a, b = (u * signs * sigma.sqrt()).float(), (sigma.sqrt()[:, None] * vh * signs[:, None]).float()
                h = (h @ b.T) @ a.T + layer.bias
            else:
                h = layer(h)
    return {"dense": {n: p.detach().clone() for n, p in params.items()}, "state": state, "out": h}


def assert_matches_plain_torch(result: dict, plain: dict, atol_out: float = 1e-5) -> None:
    """A backend's run against `plain_torch_switch`: the dense weights before the switch, the untouched
    parameters' Adam moments right after it, and the switched model's output."""
    for name, tensor in plain["dense"].items():
        assert torch.allclose(result["full_before"][name], tensor, atol=1e-6), name
    for name, moments in plain["state"].items():
        for key, value in moments.items():
            assert torch.allclose(result["state_after"][name][key], value, atol=1e-7, rtol=1e-5), (name, key)
    assert torch.allclose(result["out"], plain["out"], atol=atol_out)


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
