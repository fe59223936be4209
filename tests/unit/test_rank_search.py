"""Switch rank search: a layer too slow at its planned rank takes the largest rank down to its floor that is
fast enough. Decisions are checked against fake timings whose outcome is computed by hand in each test."""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_lowrank.config import CuttlefishConfig, FixedConfig
from dist_lowrank.plan import Plan
from dist_lowrank.profiling import SEARCH_CANDIDATES, keep_dense_where_not_faster, search_ranks
from dist_lowrank.methods.cuttlefish.rule import CuttlefishStrategy
from dist_lowrank.methods.fixed.rule import FixedRatioStrategy

pytestmark = pytest.mark.unit
CPU = torch.device("cpu")


class FakeTimer:
    """Seconds per rank from a function (dense = rank None); records every (layer width, rank) timed."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, module: nn.Module, shape, iters: int, device: torch.device) -> float:
        rank = getattr(module, "rank", None)
        self.calls.append((module.in_features, rank))
        return self.seconds(module.in_features, rank)


def linear_cost(width: int, rank):
    """Dense 1 s; factorized rank/50 s (speed-up 50/rank)."""
    return 1.0 if rank is None else rank / 50


def run(plan: Plan, timer, min_speedup: float, rank_search: bool = True, widths=None):
    widths = widths or {name: 128 for name in plan.ranks}
    modules = {n: nn.Linear(w, w) for n, w in widths.items()}
    shapes = {n: (4, w) for n, w in widths.items()}
    return keep_dense_where_not_faster(plan, modules, shapes, iters=1, min_speedup=min_speedup, device=CPU,
                                       rank_search=rank_search, timer=timer)


def test_candidate_grid_is_geometric_multiple_of_8_bounded_and_ends_at_the_floor():
    assert search_ranks(64, 20) == [48, 40, 32, 24, 20]  # 64 * (20/64)^(i/5) = 51.4, 40.1, 31.5, 24.6
    assert search_ranks(10, 3) == [8, 6, 5, 4, 3]  # below 8 no rounding to 8
    assert search_ranks(64, 64) == [] and search_ranks(64, 80) == [] and search_ranks(2, 1) == [1]
    for planned in range(2, 300, 7):
        for floor in range(1, planned, 5):
            grid = search_ranks(planned, floor)
            assert grid == sorted(set(grid), reverse=True) and grid[-1] == floor
            assert len(grid) <= SEARCH_CANDIDATES and all(floor <= r < planned for r in grid)


def test_search_takes_the_largest_rank_meeting_the_target():
    plan = Plan("switch", 10, {"a": 64, "b": 16}, floors={"a": 20, "b": 8})
    timer = FakeTimer(linear_cost)
    kept, table = run(plan, timer, min_speedup=1.5)
    # a: 64 -> 0.78x; candidates 48, 40, 32, 24, 20 -> 1.04, 1.25, 1.56, 2.08, 2.5: 32 is the largest >= 1.5
    # b: 16 -> 3.1x already: planned rank kept, never searched
    assert kept.ranks == {"a": 32, "b": 16} and kept.floors == plan.floors
    assert "rank 32 (searched from 64 down to floor 20): 1.56x faster" in kept.reasons["a"]
    assert kept.reasons["b"] == "factorized: rank 16, 3.12x faster than dense"
    assert [c["rank"] for c in table["a"]["candidates"]] == [64, 48, 40, 32, 24, 20]
    assert [c["rank"] for c in table["b"]["candidates"]] == [16]
    assert table["a"]["chosen_rank"] == 32 and table["a"]["chosen_speedup"] == pytest.approx(50 / 32)
    assert table["a"]["speedup"] == pytest.approx(50 / 64)  # the planned rank's row is kept as before
    assert table["b"]["chosen_rank"] == 16 and table["b"]["chosen_speedup"] == pytest.approx(50 / 16)


def test_largest_not_fastest_when_times_are_not_monotone():
    times = {None: 1.0, 64: 1.2, 48: 0.9, 40: 0.6, 32: 0.4, 24: 0.7, 20: 0.3}
    kept, table = run(Plan("switch", 1, {"a": 64}, floors={"a": 20}), FakeTimer(lambda w, r: times[r]), 1.5)
    assert kept.ranks == {"a": 40} and table["a"]["chosen_speedup"] == pytest.approx(1 / 0.6)  # not 20 (3.3x)


def test_floor_is_respected_and_a_failing_floor_keeps_dense():
    plan = Plan("switch", 1, {"a": 64, "nofloor": 64}, floors={"a": 20})
    timer = FakeTimer(lambda w, r: 1.0 if r is None else 0.9 + r / 1000)  # best: floor, 1.09x
    kept, table = run(plan, timer, min_speedup=1.5, widths={"a": 128, "nofloor": 96})
    assert kept.ranks == {}
    assert min(r for w, r in timer.calls if r is not None) == 20  # never below the floor
    assert "no rank from 64 down to floor 20 is 1.5x faster (best 1.09x at rank 20" in kept.reasons["a"]
    assert table["a"]["chosen_rank"] is None and table["a"]["chosen_speedup"] == 1.0
    assert [r for w, r in timer.calls if w == 96] == [None, 64]  # no floor: not searched
    assert "kept dense" in kept.reasons["nofloor"] and "no floor" in kept.reasons["nofloor"]


def test_without_rank_search_behaviour_is_unchanged():
    plan = Plan("switch", 1, {"a": 64}, floors={"a": 20})
    timer = FakeTimer(linear_cost)
    kept, table = run(plan, timer, min_speedup=1.5, rank_search=False)
    assert kept.ranks == {} and len(timer.calls) == 2 and len(table["a"]["candidates"]) == 1
    assert kept.reasons["a"] == "kept dense: factorized at rank 64 is 0.78x dense (< 1.5)"


def test_search_is_deterministic_and_bounded():
    plan = Plan("switch", 1, {"a": 64, "b": 48, "c": 40}, floors={"a": 20, "b": 7, "c": 40})
    results = []
    for _ in range(2):
        timer = FakeTimer(lambda w, r: 1.0 if r is None else r / 30)
        results.append((run(plan, timer, 1.2), len(timer.calls)))
    (first, calls), (second, calls2) = results
    assert first == second and calls == calls2
    assert calls <= 2 * len(plan.ranks) + SEARCH_CANDIDATES * len(plan.ranks)
    kept = first[0]
    # 30/r >= 1.2 needs r <= 25: a -> 24 (grid 48, 40, 32, 24, 20), b -> 24 (grid 32, 24, 16, 8, 7)
    assert search_ranks(48, 7) == [32, 24, 16, 8, 7] and kept.ranks == {"a": 24, "b": 24}
    assert "floor 40 leaves no lower rank" in kept.reasons["c"]


def test_one_all_reduce_per_round_in_a_process_group(monkeypatch):
    """A world of one on gloo: the averaged times go through all_reduce once per timing round, not per layer."""
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            calls = []
            real = dist.all_reduce
            monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (calls.append(t.numel()), real(t, *a, **k))[1])
            plan = Plan("switch", 1, {"a": 64, "b": 64, "c": 8}, floors={"a": 20, "b": 30, "c": 4})
            kept, _ = run(plan, FakeTimer(linear_cost), 1.5, widths={"a": 128, "b": 96, "c": 64})
            # round 1: 3 layers x (dense, planned); round 2: a's 5 and b's grid, c passes at rank 8
            assert calls == [6, 5 + len(search_ranks(64, 30))] and kept.ranks == {"a": 32, "b": 32, "c": 8}
            calls.clear()
            run(Plan("switch", 1, {"c": 8}, floors={"c": 4}), FakeTimer(linear_cost), 1.5)
            assert calls == [2]  # nothing failed: no second round
        finally:
            dist.destroy_process_group()


def test_same_shaped_layers_share_one_timing_per_rank():
    """Blocks of one shape are timed once per rank: equal layers take equal decisions, and the switch is cheaper."""
    noisy = iter(range(1, 1000))
    timer = FakeTimer(lambda w, r: 1.0 if r is None else next(noisy) / 100)  # every timing differs
    plan = Plan("switch", 1, {"h0": 64, "h1": 64, "other": 64}, floors={"h0": 20, "h1": 20, "other": 20})
    kept, table = run(plan, timer, 1e9, widths={"h0": 128, "h1": 128, "other": 96})
    assert table["h0"]["candidates"] == table["h1"]["candidates"] != table["other"]["candidates"]
    assert len(timer.calls) == 2 * (2 + len(search_ranks(64, 20)))  # two shapes, not three layers


def test_real_timing_on_linear_stand_ins():
    modules, shapes = {"l": nn.Linear(128, 128)}, {"l": (32, 128)}
    plan = Plan("switch", 1, {"l": 64}, floors={"l": 16})
    strict, table = keep_dense_where_not_faster(plan, modules, shapes, iters=2, min_speedup=1e9, device=CPU,
                                                rank_search=True)
    assert strict.ranks == {} and [c["rank"] for c in table["l"]["candidates"]] == [64] + search_ranks(64, 16)
    assert all(c["factorized_s"] > 0 and math.isfinite(c["speedup"]) for c in table["l"]["candidates"])
    lenient, table = keep_dense_where_not_faster(plan, modules, shapes, iters=2, min_speedup=1e-9, device=CPU,
                                                 rank_search=True)
    assert lenient.ranks == {"l": 64} and len(table["l"]["candidates"]) == 1


def test_cuttlefish_scaled_plan_carries_raw_rule_floors():
    cfg = CuttlefishConfig(max_switch_step=20)
    strategy = CuttlefishStrategy(cfg, {"a": (64, 64), "b": (128, 32)}, min_rank=2)
    strategy.observe(0, {"a": 20.0, "b": 4.0})  # xi_a = 3.2, xi_b = 8
    strategy.observe(10, {"a": 8.0, "b": 2.0})
    plan = strategy.observe(20, {"a": 7.3, "b": 1.1})
    assert plan.ranks == {"a": math.ceil(3.2 * 7.3), "b": math.ceil(8 * 1.1)}
    assert plan.floors == {"a": 8, "b": 2}  # ceil(7.3); ceil(1.1) = 2 = min_rank
    assert "floor 8" in plan.reasons["a"]
    assert Plan.from_json(plan.to_json()) == plan
    fraction = CuttlefishStrategy(CuttlefishConfig(max_switch_step=20, floor_fraction=0.25), {"a": (64, 64)})
    fraction.observe(0, {"a": 20.0})
    assert fraction.observe(20, {"a": 7.3}).floors == {"a": 16}  # floor_fraction * 64 beats ceil(srank)
    raw = CuttlefishStrategy(CuttlefishConfig(max_switch_step=20, rank_rule="raw"), {"a": (64, 64)})
    raw.observe(0, {"a": 20.0})
    assert raw.observe(20, {"a": 7.3}).floors == {}  # the raw rank is its own floor
    fixed = FixedRatioStrategy(FixedConfig(ratio=0.25, warmup_steps=1), {"a": (64, 64)})
    assert fixed.observe(1, {}).floors == {}


def test_a_burst_of_load_does_not_change_the_decision():
    """Candidates take turns pass by pass: a burst as long as one candidate's passes (here 3 calls, 100x the
    cost) inflates one pass of several candidates, not all passes of one, so each keeps a clean fastest pass and
    the plan is the quiet machine's. Timed one after the other, dense would absorb the burst and look slow."""
    calls = iter(range(10_000))
    burst = range(0, 3)  # the first three timed passes
    timer = FakeTimer(lambda w, r: (100.0 if next(calls) in burst else 1.0) * linear_cost(w, r))
    plan = Plan("switch", 1, {"a": 64}, floors={"a": 20})
    quiet, _ = run(plan, FakeTimer(linear_cost), 1.5)
    modules, shapes = {"a": nn.Linear(128, 128)}, {"a": (4, 128)}
    loaded, table = keep_dense_where_not_faster(plan, modules, shapes, iters=3, min_speedup=1.5, device=CPU,
                                                rank_search=True, timer=timer)
    assert quiet.ranks == loaded.ranks == {"a": 32}  # 50/32 = 1.56x; 50/40 = 1.25x
    assert table["a"]["dense_s"] == 1.0 and table["a"]["factorized_s"] == 64 / 50
