"""InRank in one process: growth decisions from the spectrum, function unchanged, O(log r) reshards."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dist_lowrank.backends.local_backend import LocalBackend
from dist_lowrank.config import config_from_dict
from dist_lowrank.controller import LowRankController
from dist_lowrank.errors import ConfigError
from dist_lowrank.inrank_model import inrank_layers, to_inrank
from dist_lowrank.layers import max_saving_rank
from dist_lowrank.strategies import next_capacity
from examples.common import digits, mlp

pytestmark = pytest.mark.unit

INRANK = {"strategy": "inrank", "target_modules": ["2", "4"],
          "inrank": {"init_rank": 2, "warmup": 10, "gap": 5, "tau": 0.9, "buffer": 6, "capacity_multiple": 4,
                     "growth_factor": 1.5, "w0_mode": "frozen"}}


def test_growth_keeps_function_and_state_and_follows_capacity_schedule():
    cfg = config_from_dict(INRANK)
    model = to_inrank(mlp(), cfg)
    # rank 2 + buffer 6 columns are trained; capacity = 8 rounded to the multiple 4
    assert {n: (m.rank, m.capacity) for n, m in inrank_layers(model).items()} == {"2": (8, 8), "4": (8, 8)}
    backend = LocalBackend(model, lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01))
    controller = LowRankController(backend, cfg)
    controller.start()
    probe = torch.rand(5, 64)
    batches = digits(batch=64)
    losses, trajectory = [], {n: [2] for n in controller.names}
    reshards = 0
    for step in range(1, 81):
        x, y = next(batches)
        loss = F.cross_entropy(backend.model(x), y)
        backend.backward(loss)
        backend.step()
        losses.append(float(loss.detach()))
        with torch.no_grad():
            before = backend.model(probe).clone()
        named = dict(backend.module.named_parameters())
        state_before = {n: copy.deepcopy(backend.optimizer.state[p]) for n, p in named.items() if n.startswith("0.")}
        plan = controller.after_step(step, losses[-1])
        if plan is None:
            continue
        assert plan.kind == "grow" and step >= 10 and (step - 10) % 5 == 0
        with torch.no_grad():
            assert torch.allclose(backend.model(probe), before, atol=1e-6)  # growth leaves the function unchanged
        named = dict(backend.module.named_parameters())
        for name, state in state_before.items():  # untouched parameters: state bit for bit
            for key, value in state.items():
                assert torch.equal(backend.optimizer.state[named[name]][key], value)
        for name, rank in plan.ranks.items():
            assert rank > trajectory[name][-1]  # never shrinks
            trajectory[name].append(rank)
        reshards += len(plan.capacities)
    layers = inrank_layers(backend.module)
    assert any(len(t) > 1 for t in trajectory.values()), "no growth happened"
    expected = 0
    for name, ranks in trajectory.items():
        cap = 8
        m, n = controller.dims[name]
        for rank in ranks[1:]:
            new = next_capacity(cap, min(rank + 6, max_saving_rank(m, n)), 1.5, 4, max_saving_rank(m, n))
            expected += new != cap
            cap = new
        assert layers[name].capacity == cap and layers[name].rank == min(ranks[-1] + 6, max_saving_rank(m, n))
    assert reshards == expected
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    spectra = [e for e in controller.events if e["event"] == "spectrum"]
    assert spectra and all(e["gram_bytes"] == 0 for e in spectra)  # one process: nothing communicated


def test_inrank_needs_converted_model_and_linear_targets():
    cfg = config_from_dict(INRANK)
    with pytest.raises(ConfigError, match="to_inrank"):
        LowRankController(LocalBackend(mlp(), lambda p: torch.optim.SGD(p, lr=0.1)), cfg)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    with pytest.raises(ConfigError, match="Conv2d"):
        to_inrank(conv, config_from_dict({"strategy": "inrank", "target_modules": ["0"]}))


def test_reference_variant_without_w0_is_a_truncated_svd_that_grows():
    """w0_mode "none" (the released InRank code: W = U Vᵀ only): spectral init at the trained width."""
    cfg = config_from_dict({**INRANK, "inrank": {**INRANK["inrank"], "w0_mode": "none"}})
    dense = mlp()
    model = to_inrank(copy.deepcopy(dense), cfg)
    layer = inrank_layers(model)["2"]
    assert layer.w0 is None and layer.rank == 8
    u, v = layer.lowrank_part()
    s = torch.linalg.svdvals(dense[2].weight.detach().double())
    err = torch.linalg.norm((dense[2].weight - u @ v.T).double())
    assert float(err) == pytest.approx(float(s[8:].square().sum().sqrt()), rel=1e-4)
    probe = torch.rand(3, 64)
    with torch.no_grad():
        before = model(probe)
        bigger = layer.with_capacity(16)
        bigger.grow(12)
        model[2] = bigger
        assert torch.allclose(model(probe), before, atol=1e-6)
