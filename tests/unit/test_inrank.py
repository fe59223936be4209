"""InRank in one process: growth decisions from the spectrum, function unchanged, O(log r) reshards."""
from __future__ import annotations

import copy

import pytest
import torch

from dist_lowrank.backends.local_backend import LocalBackend
from dist_lowrank.config import config_from_dict
from dist_lowrank.controller import LowRankController
from dist_lowrank.errors import ConfigError
from dist_lowrank.methods.inrank.model import inrank_layers, to_inrank
from dist_lowrank.layers import max_saving_rank
from dist_lowrank.methods.inrank.rule import next_capacity
from examples.common import mlp

pytestmark = pytest.mark.unit

INRANK = {"strategy": "inrank", "target_modules": ["2", "4"],
          "inrank": {"init_rank": 2, "warmup": 10, "gap": 5, "tau": 0.9, "buffer": 6, "capacity_multiple": 4,
                     "growth_factor": 1.5, "w0_mode": "frozen"}}


def test_growth_keeps_function_and_state_and_follows_capacity_schedule():
    from tests.distributed.inrank_workers import reference_inrank

    cfg = config_from_dict(INRANK)
    # rank 2 + buffer 6 columns are trained; capacity = 8 rounded to the multiple 4
    assert {n: (m.rank, m.capacity) for n, m in inrank_layers(to_inrank(mlp(), cfg)).items()} == \
        {"2": (8, 8), "4": (8, 8)}
    run = reference_inrank()  # one process: LocalBackend + controller, 40 steps on digits
    assert run["decisions"], "no growth happened"
    assert max(run["unchanged"]) < 1e-6 and all(run["untouched_bitwise"])
    ranks, caps, reshards = {"2": 2, "4": 2}, {"2": 8, "4": 8}, 0
    for step, kind, new_ranks, new_caps in run["decisions"]:
        assert kind == "grow" and step >= 10 and (step - 10) % 5 == 0
        for name, rank in new_ranks.items():
            assert rank > ranks[name]  # never shrinks
            m, n = (256, 256) if name == "2" else (128, 256)
            expected = next_capacity(caps[name], min(rank + 6, max_saving_rank(m, n)), 1.5, 4, max_saving_rank(m, n))
            assert new_caps.get(name, caps[name]) == expected  # the capacity schedule, exactly
            reshards += expected != caps[name]
            ranks[name], caps[name] = rank, expected
        assert reshards == sum(len(c) for *_, c in run["decisions"][: run["decisions"].index((step, kind, new_ranks,
                                                                                              new_caps)) + 1])
    assert sum(run["losses"][-10:]) < 0.6 * sum(run["losses"][:10])
    assert all(b == 0 for b in run["gram_bytes"])  # one process: nothing communicated


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
