"""Speed target on the layers together (switch.speedup_scope: total): ranks are lowered where a step down saves
most time per rank given up. Outcomes are worked out by hand from the fake timings in each test."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_lowrank.plan import Plan
from dist_lowrank.profiling import keep_dense_where_not_faster, search_ranks
from dist_lowrank.rank_budget import allocate_total_speedup, total_speedup

pytestmark = pytest.mark.unit


def row(dense: float, times: dict[int, float]) -> dict:
    return {"dense_s": dense, "candidates": [{"rank": r, "factorized_s": t} for r, t in times.items()]}


def test_the_expensive_layer_is_lowered_first_and_the_target_is_met():
    table = {"big": row(3.0, {64: 1.5, 32: 0.8}), "small": row(1.0, {64: 0.5, 32: 0.3})}
    # start: (3 + 1) / (1.5 + 0.5) = 2.0; per log2 of rank given up: big saves 0.7 s, small 0.2 s
    assert total_speedup(table, {"big": 64, "small": 64}) == pytest.approx(2.0)
    assert allocate_total_speedup(table, 2.0) == {"big": 64, "small": 64}
    assert allocate_total_speedup(table, 2.5) == {"big": 32, "small": 64}  # 4 / 1.3 = 3.08 >= 2.5
    assert allocate_total_speedup(table, 3.2) == {"big": 32, "small": 32}  # 4 / 1.1 = 3.6
    assert allocate_total_speedup(table, 9.0) == {"big": 32, "small": 32}  # out of reach: every layer at its fastest


def test_a_layer_missing_a_per_layer_bar_stays_factorized_and_one_never_faster_stays_dense():
    table = {"near": row(1.0, {48: 0.52}), "slow": row(1.0, {48: 1.1, 32: 1.02}), "fast": row(1.0, {48: 0.2})}
    chosen = allocate_total_speedup(table, 2.0)
    assert chosen == {"near": 48, "slow": None, "fast": 48}  # 1.92x alone: kept factorized; slow: never faster
    assert total_speedup(table, chosen) == pytest.approx(3 / (0.52 + 1.0 + 0.2))


def test_slower_lower_ranks_are_skipped_and_ties_go_to_the_first_name():
    table = {"b": row(2.0, {64: 1.0, 48: 1.2, 32: 0.6}), "a": row(2.0, {64: 1.0, 48: 1.2, 32: 0.6})}
    assert allocate_total_speedup(table, 2.5) == {"a": 32, "b": 64}  # 48 is slower than 64: not an option
    assert allocate_total_speedup(table, 3.0) == {"a": 32, "b": 32}


def test_profiling_with_total_scope_searches_every_layer_and_explains_the_choice():
    plan = Plan("switch", 10, {"big": 64, "small": 64}, floors={"big": 20, "small": 20})
    modules = {"big": nn.Linear(128, 128), "small": nn.Linear(96, 96)}
    shapes = {n: (4, m.in_features) for n, m in modules.items()}

    def timer(module: nn.Module, shape, iters: int, device: torch.device) -> float:
        scale = 3.0 if module.in_features == 128 else 1.0  # dense 3 s and 1 s; factorized rank/100 scaled alike
        rank = getattr(module, "rank", None)
        return scale * (1.0 if rank is None else rank / 100)

    kept, table = keep_dense_where_not_faster(plan, modules, shapes, iters=1, min_speedup=2.5,
                                              device=torch.device("cpu"), rank_search=True, timer=timer,
                                              scope="total")
    assert [c["rank"] for c in table["small"]["candidates"]] == [64] + search_ranks(64, 20)  # searched, though 1.56x
    # start 4 / 2.56 = 1.56x; big's steps save 3x small's per log-rank: big goes to the floor before small moves
    grid = search_ranks(64, 20)
    expected, chosen = {"big": 64, "small": 64}, {}
    for r in grid:  # big first, one candidate at a time, until 4 / (3 r_big + r_small) / 100 >= 2.5
        expected["big"] = r
        if 4 / (3 * r + 64) * 100 >= 2.5:
            break
    assert 4 / (3 * expected["big"] + 64) * 100 >= 2.5 and expected["big"] < 64
    assert kept.ranks == expected and table["big"]["chosen_rank"] == expected["big"]
    assert table["small"]["chosen_rank"] == 64 and table["small"]["chosen_speedup"] == pytest.approx(100 / 64)
    together = total_speedup(table, {"big": expected["big"], "small": 64})
    assert f"together {together:.2f}x faster than dense, target 2.5" in kept.reasons["big"]
    assert "searched from 64 down to floor 20" in kept.reasons["big"] and "rank 64," in kept.reasons["small"]
    assert math.isfinite(together)
