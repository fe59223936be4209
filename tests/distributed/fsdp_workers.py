"""FSDP2 switch workers, and the Conv2d switch worker shared with the DDP test (module level for the
spawn harness)."""
from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

from tests.distributed.switch_common import (train_after_switch, PLAN_RANKS, PRE_STEPS, UNTOUCHED, fixed_input, local_batch,
                                      loss_fn, make_model, optimizer_factory, scheduler_factory)
from dist_lowrank.reshape.builders import switch_change


def parallelize(model: nn.Module) -> nn.Module:
    """Shard every Linear (or factor pair's halves) on its own, then the root."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)
    return model


def _full_state(optimizer, params: dict, names) -> dict:
    out = {}
    for name in names:
        state = optimizer.state[params[name]]
        out[name] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                     for k, v in state.items()}
    return out


def fsdp2_switch_worker(rank: int, world: int):
    from torch.distributed.tensor import DTensor

    from dist_lowrank.backends.fsdp2_backend import FSDP2Backend
    backend = FSDP2Backend(make_model, parallelize, optimizer_factory, scheduler_factory)
    for step in range(PRE_STEPS):
        backend.backward(loss_fn(backend.model, local_batch(step, rank, world)))
        backend.step()
    views = backend.shard_views(sorted(PLAN_RANKS))
    from dist_lowrank.monitor import RankMonitor

    monitor = RankMonitor("lanczos", 20)
    estimates = {n: r.value for n, r in monitor.estimate(views).items()}
    monitor_bytes = monitor.stats.bytes
    params = dict(backend.model.named_parameters())
    full_before = {n: p.full_tensor().detach().clone() for n, p in params.items()}
    state_before = _full_state(backend.optimizer, params, UNTOUCHED)
    old_ref = weakref.ref(params["net.2.weight"])
    del params
    backend.apply(switch_change(backend.unwrapped_model(), dict(PLAN_RANKS), PRE_STEPS))
    gc.collect()
    released = old_ref() is None
    params = dict(backend.model.named_parameters())
    all_dtensor = all(isinstance(p, DTensor) for p in params.values())
    state_after = _full_state(backend.optimizer, params, UNTOUCHED)
    new_factor_state = [bool(backend.optimizer.state.get(p)) for n, p in params.items() if n not in state_after]
    with torch.no_grad():
        out = backend.model(fixed_input())
    factors_before = {n: p.full_tensor().clone() for n, p in params.items() if ".first." in n or ".second." in n}
    losses = train_after_switch(backend, rank, world)
    final = {n: p.full_tensor().detach().clone() for n, p in backend.model.named_parameters()}
    factors_changed = all(not torch.equal(final[n], v) for n, v in factors_before.items())
    return {"views": [(v.name, v.dims, v.flat_offset, v.local_flat.clone()) for v in views],
            "full_before": full_before, "state_before": state_before, "state_after": state_after,
            "new_factor_state": new_factor_state, "out": out, "losses": losses, "final": final,
            "released": released, "factors_changed": factors_changed, "all_dtensor": all_dtensor,
            "estimates": estimates, "monitor_bytes": monitor_bytes}


def uneven_model() -> nn.Module:
    """7 rows (4 + 3 over 2 ranks), 3 rows (2 + 1) and 1 row (1 + an empty shard)."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3), nn.Linear(3, 1))


def fsdp2_uneven_views_worker(rank: int, world: int):
    """Uneven row counts: the views must tile each flattened matrix exactly."""
    from dist_lowrank.backends.fsdp2_backend import FSDP2Backend

    backend = FSDP2Backend(uneven_model, parallelize, optimizer_factory)
    return [(v.dims, v.flat_offset, v.local_flat.clone()) for v in backend.shard_views(["0", "1", "2"])]


# --- Conv2d model, shared by the FSDP2 and DDP conv tests (other optimizers: Adam amsgrad, SGD momentum) ---

CONV_RANKS = {"features.2": 3}
CONV_UNTOUCHED = ["features.0.weight", "features.0.bias", "head.weight", "head.bias"]
CONV_PRE_STEPS, CONV_BATCH = 2, 8


class ConvNet(nn.Module):
    """7 output channels in the factorized conv: uneven row shards (4 + 3) of its (7 × 8·3·3) matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 7, 3, padding=1),
                                      nn.Tanh())
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def make_conv_model() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet()


def conv_batch(step: int, rank: int = 0, world: int = 1):
    """This rank's half of the global batch of `step` (world=1: the whole batch)."""
    gen = torch.Generator().manual_seed(2000 + step)
    x = torch.randn(CONV_BATCH, 3, 6, 6, generator=gen)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0.1).long()
    per = CONV_BATCH // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def conv_input() -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(11))


def adam_amsgrad(params):
    return torch.optim.Adam(params, lr=1e-2, amsgrad=True)


def sgd_momentum(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


CONV_OPTIMIZERS = {"fsdp2": adam_amsgrad, "ddp": sgd_momentum}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def _is_factor(name: str) -> bool:
    return any(name.startswith(f"{layer}.") for layer in CONV_RANKS)


def _conv_backend(name: str):
    if name == "fsdp2":
        from dist_lowrank.backends.fsdp2_backend import FSDP2Backend, shard_each_layer

        return FSDP2Backend(make_conv_model, shard_each_layer, adam_amsgrad)
    from dist_lowrank.backends.ddp_backend import DDPBackend

    return DDPBackend(make_conv_model(), sgd_momentum)


def conv_switch_worker(rank: int, world: int, backend_name: str) -> dict:
    """Conv switch: views tile the (c_out × c_in·k·k) matrix, state of untouched params kept bit for bit
    (every key), factors start fresh, old engine released, factor gradients synchronized."""
    backend = _conv_backend(backend_name)
    for step in range(CONV_PRE_STEPS):
        backend.backward(loss_fn(backend.model, conv_batch(step, rank, world)))
        backend.step()
    module = backend.unwrapped_model()
    views = [(v.name, v.dims, v.flat_offset, v.local_flat.clone(), v.replicated)
             for v in backend.shard_views(["features.0", "features.2"])]
    params = dict(module.named_parameters())
    full_before = {n: _full(p) for n, p in params.items()}
    state_before = {n: {k: _full(v) for k, v in backend.optimizer.state[params[n]].items()} for n in CONV_UNTOUCHED}
    old = [weakref.ref(obj) for obj in (backend.model, backend.optimizer, params["features.2.weight"])]
    del params, module
    measurements = backend.apply(switch_change(backend.unwrapped_model(), dict(CONV_RANKS), CONV_PRE_STEPS))
    gc.collect()
    released = [ref() is None for ref in old]
    params = dict(backend.unwrapped_model().named_parameters())
    state_after = {n: {k: _full(v) for k, v in backend.optimizer.state[params[n]].items()} for n in CONV_UNTOUCHED}
    factor_names = sorted(n for n in params if _is_factor(n))
    factor_state = [bool(backend.optimizer.state.get(params[n])) for n in factor_names]
    factor_types = sorted({type(params[n]).__name__ for n in factor_names})
    with torch.no_grad():
        out = backend.model(conv_input())
    backend.backward(loss_fn(backend.model, conv_batch(CONV_PRE_STEPS, rank, world)))
    grads = {n: None if params[n].grad is None else _full(params[n].grad) for n in factor_names}
    backend.step()
    steps = {n: float(backend.optimizer.state[p]["step"]) for n, p in params.items()
             if "step" in backend.optimizer.state[p]}
    final = {n: _full(p) for n, p in params.items()}
    naive = _naive_swap_grads(rank, world, full_before) if backend_name == "fsdp2" else None
    return {"views": views, "full_before": full_before, "state_before": state_before, "state_after": state_after,
            "factor_state": factor_state, "factor_types": factor_types, "released": released, "out": out,
            "grads": grads, "steps": steps, "final": final, "naive_grads": naive, "measurements": measurements}


def _naive_swap_grads(rank: int, world: int, full_before: dict) -> dict:
    """The DESIGN §3 trap, as a control: swap the factorized module into an already sharded model
    (no rebuild). FSDP2 does not manage it: plain tensors, local gradients never reduced."""
    import copy

    from dist_lowrank.backends.fsdp2_backend import shard_each_layer
    from dist_lowrank.layers import LowRankConv2d
    from dist_lowrank.surgery import replace_module

    model = make_conv_model()
    model.load_state_dict(full_before)
    dense = copy.deepcopy(model.features[2])
    shard_each_layer(model)
    replace_module(model, "features.2", LowRankConv2d.from_dense(dense, CONV_RANKS["features.2"]))
    loss_fn(model, conv_batch(CONV_PRE_STEPS, rank, world)).backward()
    return {n: (type(p).__name__, p.grad.detach().clone()) for n, p in model.named_parameters() if _is_factor(n)}


def conv_reference(backend_name: str) -> dict:
    """One process, whole batches, same optimizer: pre-steps, switch, one step (what the ranks must match)."""
    from dist_lowrank.backends.local_backend import LocalBackend
    backend = LocalBackend(make_conv_model(), CONV_OPTIMIZERS[backend_name])
    for step in range(CONV_PRE_STEPS):
        backend.backward(loss_fn(backend.model, conv_batch(step)))
        backend.step()
    backend.apply(switch_change(backend.unwrapped_model(), dict(CONV_RANKS), CONV_PRE_STEPS))
    params = dict(backend.module.named_parameters())
    backend.backward(loss_fn(backend.model, conv_batch(CONV_PRE_STEPS)))
    grads = {n: p.grad.detach().clone() for n, p in params.items() if _is_factor(n)}
    backend.step()
    return {"grads": grads, "final": {n: p.detach().clone() for n, p in params.items()}}


def factorized_conv_output(full_weights: dict) -> torch.Tensor:
    """The gathered pre-switch weights, factorized in one process with apply_rank_plan."""
    from dist_lowrank.surgery import apply_rank_plan

    model = make_conv_model()
    model.load_state_dict(full_weights)
    apply_rank_plan(model, dict(CONV_RANKS))
    with torch.no_grad():
        return model(conv_input())


def assert_conv_switch(ranks: list[dict], backend_name: str) -> None:
    """What both conv tests check against the single-process references."""
    reference = conv_reference(backend_name)
    full_before = ranks[0]["full_before"]
    for name in ("features.0", "features.2"):  # views tile the row-major (c_out × c_in·k·k) matrix
        weight = full_before[f"{name}.weight"]
        pieces = sorted(((v[2], v[3], v[4]) for r in ranks for v in r["views"] if v[0] == name), key=lambda t: t[0])
        assert all(v[1] == (weight.shape[0], weight[0].numel()) for r in ranks for v in r["views"] if v[0] == name)
        if backend_name == "ddp":
            assert all(rep and off == 0 and torch.equal(flat, weight.reshape(-1)) for off, flat, rep in pieces)
        else:
            assert [off for off, _, _ in pieces] == [0, pieces[0][1].numel()]
            assert torch.equal(torch.cat([flat for _, flat, _ in pieces]), weight.reshape(-1))
    expected_out = factorized_conv_output(full_before)
    for r in ranks:
        assert all(r["released"]), f"old wrapper / optimizer / parameter still referenced: {r['released']}"
        assert torch.allclose(r["out"], expected_out, atol=1e-5)
        for name in CONV_UNTOUCHED:  # every state key, bit for bit
            assert r["state_before"][name].keys() == r["state_after"][name].keys()
            for key, value in r["state_before"][name].items():
                assert torch.equal(value, r["state_after"][name][key]), (name, key)
        assert r["factor_state"] and not any(r["factor_state"])
        for name, grad in r["grads"].items():  # factors receive the all-reduced gradient of the global batch
            assert grad is not None and grad.abs().sum() > 0, name
            assert torch.allclose(grad, reference["grads"][name], atol=1e-6), name
        for name, tensor in r["final"].items():
            assert torch.allclose(tensor, reference["final"][name], atol=1e-6), name
    assert ranks[0]["full_before"].keys() == ranks[1]["full_before"].keys()
