"""Controller: cadence, non-finite steps never reach the strategy, measured keep-dense decisions."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_lowrank.backends.local_backend import LocalBackend
from dist_lowrank.config import config_from_dict
from dist_lowrank.controller import LowRankController
from dist_lowrank.plan import Plan
from dist_lowrank.profiling import keep_dense_where_not_faster

pytestmark = pytest.mark.unit


def backend():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    return LocalBackend(model, lambda p: torch.optim.SGD(p, lr=0.01))


def test_nonfinite_steps_are_not_fed_to_the_strategy():
    cfg = config_from_dict({"target_modules": ["2"], "monitor": {"cadence_steps": 1},
                            "switch": {"profile_layers": False}})
    controller = LowRankController(backend(), cfg)
    controller.start()
    assert controller.after_step(1, 1.0) is None
    history = list(controller.method.rule.history["2"])
    assert controller.after_step(2, float("nan")) is None
    assert controller.after_step(3, float("inf")) is None
    assert controller.method.rule.history["2"] == history and controller.skipped_steps == 2
    controller.after_step(4, 0.5)
    assert len(controller.method.rule.history["2"]) == len(history) + 1
    assert [e["event"] for e in controller.events].count("skipped_nonfinite") == 2


def test_cadence_and_forced_switch_through_the_backend():
    cfg = config_from_dict({"target_modules": ["2", "4"], "monitor": {"cadence_steps": 3},
                            "cuttlefish": {"max_switch_step": 6, "rank_rule": "raw"}, "switch": {"profile_layers": False}})
    b = backend()
    controller = LowRankController(b, cfg)
    controller.start()
    plans = [controller.after_step(step, 1.0) for step in range(1, 8)]
    estimates = [e["step"] for e in controller.events if e["event"] == "estimate"]
    assert estimates == [0, 3, 6]
    assert [p is not None for p in plans] == [False] * 5 + [True, False]
    assert plans[5].ranks and plans[5].ranks == controller.ranks
    assert all(isinstance(dict(b.module.named_modules())[n].first, nn.Linear) for n in plans[5].ranks)


def test_keep_dense_where_not_faster_uses_measured_times():
    modules = {"big": nn.Linear(512, 512), "small": nn.Linear(16, 16)}
    shapes = {"big": (64, 512), "small": (64, 16)}
    plan = Plan("switch", 10, {"big": 16, "small": 4})
    kept, table = keep_dense_where_not_faster(plan, modules, shapes, iters=3, min_speedup=1e9,
                                              device=torch.device("cpu"))
    assert kept.ranks == {} and all("kept dense" in kept.reasons[n] for n in plan.ranks)
    assert set(table) == {"big", "small"} and all(t["dense_s"] > 0 for t in table.values())
    lenient, _ = keep_dense_where_not_faster(plan, modules, shapes, iters=3, min_speedup=1e-9,
                                             device=torch.device("cpu"))
    assert lenient.ranks == plan.ranks and all(math.isfinite(t["speedup"]) for t in table.values())
    untimed, _ = keep_dense_where_not_faster(plan, modules, {}, iters=1, min_speedup=1e9, device=torch.device("cpu"))
    assert untimed.ranks == plan.ranks and "not timed" in untimed.reasons["big"]


def test_rank_multiple_rounds_the_executed_ranks_up_where_they_still_save():
    """switch.rank_multiple=8: the same run as without it, each rank rounded up to a multiple of 8 unless that
    leaves the layer's saving cap ((m·n − 1) // (m + n): 31 for 64×64, 3 for 4×64), and the model built so."""
    def switched(multiple: int) -> tuple[dict, nn.Module]:
        cfg = config_from_dict({"target_modules": ["2", "4"], "monitor": {"cadence_steps": 3},
                                "cuttlefish": {"max_switch_step": 6, "rank_rule": "raw"},
                                "switch": {"profile_layers": False, "rank_multiple": multiple}})
        b = backend()
        controller = LowRankController(b, cfg)
        controller.start()
        plan = next(p for p in (controller.after_step(step, 1.0) for step in range(1, 8)) if p is not None)
        return plan.ranks, b.module

    planned, _ = switched(1)
    caps = {"2": 31, "4": 3}
    expected = {n: -(-r // 8) * 8 if -(-r // 8) * 8 <= caps[n] else r for n, r in planned.items()}
    assert expected != planned, "control: the raw ranks here are not all multiples of 8 already"
    aligned, model = switched(8)
    assert aligned == expected
    assert {n: dict(model.named_modules())[n].first.out_features for n in aligned} == expected
