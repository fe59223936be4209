"""Strategies: pure decisions on synthetic trajectories, predicted independently in each test."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dist_lowrank.config import CuttlefishConfig, FixedConfig, InRankConfig
from dist_lowrank.linalg import explained_ratio
from dist_lowrank.strategies import (CuttlefishStrategy, FixedRatioStrategy, InRankGrowthRule, ema, next_capacity,
                                     stability_score)

pytestmark = pytest.mark.unit
DIMS = {"a": (64, 64), "b": (128, 32)}


def trajectory(step: int, name: str) -> float:
    """Decaying towards a plateau: a at 10, b at 6."""
    base, start = (10.0, 40.0) if name == "a" else (6.0, 20.0)
    return base + (start - base) * math.exp(-step / 30.0)


def predicted_switch(cfg: CuttlefishConfig, cadence: int, horizon: int) -> int:
    """Independent numpy computation of the first measurement step where every layer is stable."""
    alpha = 2 / (cfg.ema_window + 1)
    steps = list(range(cadence, horizon, cadence))
    stable = {n: False for n in DIMS}
    for i, step in enumerate(steps):
        for name in DIMS:
            xs = np.array([trajectory(s, name) for s in steps[: i + 1]])
            e = np.empty_like(xs)
            e[0] = xs[0]
            for t in range(1, len(xs)):
                e[t] = alpha * xs[t] + (1 - alpha) * e[t - 1]
            d = np.abs(np.diff(e))
            if len(d) >= cfg.last_k and d[-cfg.last_k:].mean() < cfg.threshold:
                stable[name] = True
        if all(stable.values()):
            return step
    return -1


def run_strategy(strategy, cadence=10, horizon=1000, stop_at=None):
    strategy.observe(0, {n: trajectory(0, n) for n in DIMS})
    for step in range(cadence, horizon, cadence):
        if stop_at is not None and step == stop_at:
            return None, strategy
        plan = strategy.observe(step, {n: trajectory(step, n) for n in DIMS})
        if plan is not None:
            return plan, strategy
    return None, strategy


def test_ema_and_score_by_hand():
    assert ema([1.0, 3.0, 3.0], 3) == [1.0, 2.0, 2.5]
    assert stability_score([1.0, 3.0, 3.0], 3, 2) == pytest.approx((1.0 + 0.5) / 2)
    assert stability_score([1.0, 3.0], 3, 2) is None


def test_switch_at_predicted_step_with_scaled_ranks():
    cfg = CuttlefishConfig(ema_window=5, last_k=4, threshold=0.2, relax_threshold=False)
    plan, strategy = run_strategy(CuttlefishStrategy(cfg, DIMS))
    assert plan is not None and plan.step == predicted_switch(cfg, 10, 1000)
    for name, (m, n) in DIMS.items():
        xi = min(m, n) / trajectory(0, name)
        expected = math.ceil(xi * trajectory(plan.step, name))
        assert plan.ranks.get(name) == expected or "saves no parameters" in plan.reasons[name]
    assert strategy.done and strategy.observe(plan.step + 10, {"a": 1.0, "b": 1.0}) is None


def test_raw_rule_floor_cap_and_no_saving_exclusion():
    cfg = CuttlefishConfig(rank_rule="raw", floor_fraction=0.25, relax_threshold=False, threshold=0.2)
    strategy = CuttlefishStrategy(cfg, {"a": (64, 64), "tiny": (4, 4)})
    strategy.xi = {"a": 1.0, "tiny": 1.0}
    assert strategy.choose_rank("a", 3.2) == 16  # floor 0.25 * 64
    assert strategy.choose_rank("a", 30.2) == 31
    assert strategy.choose_rank("a", 500.0) == 64  # capped at full rank
    forced = CuttlefishStrategy(CuttlefishConfig(max_switch_step=30), {"a": (64, 64), "tiny": (4, 4)})
    forced.observe(0, {"a": 20.0, "tiny": 3.0})  # xi_a = 64 / 20
    assert forced.observe(10, {"a": 5.0, "tiny": 3.0}) is None
    assert forced.observe(20, {"a": 9.0, "tiny": 3.0}) is None
    plan = forced.observe(30, {"a": 7.0, "tiny": 3.0})
    assert plan is not None and plan.ranks["a"] == math.ceil(64 / 20 * 7.0) and "forced" in plan.reasons["a"]
    assert "tiny" not in plan.ranks and "saves no parameters" in plan.reasons["tiny"]


def test_nonconverging_never_switches_without_max_step():
    strategy = CuttlefishStrategy(CuttlefishConfig(threshold=0.01, relax_threshold=False), DIMS)
    strategy.observe(0, {"a": 10.0, "b": 10.0})
    for step in range(10, 500, 10):
        assert strategy.observe(step, {"a": 10.0 + 5 * (step // 10 % 2), "b": 10.0}) is None


def test_nan_observation_is_skipped():
    cfg = CuttlefishConfig(ema_window=5, last_k=4, threshold=0.2, relax_threshold=False)
    clean, _ = run_strategy(CuttlefishStrategy(cfg, DIMS))
    noisy = CuttlefishStrategy(cfg, DIMS)
    noisy.observe(0, {n: trajectory(0, n) for n in DIMS})
    with pytest.warns(RuntimeWarning, match="non-finite"):
        noisy.observe(5, {"a": float("nan"), "b": float("nan")})
    assert noisy.history == {"a": [], "b": []}


def test_resume_mid_trajectory_gives_identical_plan():
    cfg = CuttlefishConfig(ema_window=5, last_k=4, threshold=0.2)
    uninterrupted, _ = run_strategy(CuttlefishStrategy(cfg, DIMS))
    _, first = run_strategy(CuttlefishStrategy(cfg, DIMS), stop_at=60)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = CuttlefishStrategy(cfg, DIMS)
    resumed.load_state_dict(state)
    plan = None
    for step in range(60, 1000, 10):
        plan = resumed.observe(step, {n: trajectory(step, n) for n in DIMS})
        if plan:
            break
    assert plan == uninterrupted and plan.digest() == uninterrupted.digest()


def test_relaxation_is_monotone():
    strategy = CuttlefishStrategy(CuttlefishConfig(threshold=0.1), {"a": (8, 8), "b": (8, 8), "c": (8, 8)})
    t0 = strategy.threshold()
    strategy.stable["a"] = True
    t1 = strategy.threshold()
    strategy.stable["b"] = True
    assert t0 <= t1 <= strategy.threshold() <= 0.4


def test_next_capacity_is_geometric():
    assert next_capacity(8, 8, 1.5, 8, 100) == 8
    assert next_capacity(8, 9, 1.5, 8, 100) == 16
    assert next_capacity(16, 40, 1.5, 8, 100) == 40
    assert next_capacity(64, 65, 1.5, 8, 70) == 70  # capped where factorizing stops saving
    cap, reshards = 8, 0
    for needed in range(1, 257):
        new = next_capacity(cap, needed, 1.5, 8, 1000)
        reshards += new != cap
        cap = new
    assert reshards <= math.ceil(math.log(256 / 8, 1.5)) + 1


def test_inrank_growth_decisions():
    cfg = InRankConfig(warmup=10, gap=5, tau=0.9, buffer=4, init_rank=2)
    rule = InRankGrowthRule(cfg, {"a": (64, 64)})
    s = torch.tensor([5.0, 4.0, 3.5, 3.0, 0.1, 0.05])
    assert rule.decide(12, {"a": s}, {"a": 2}, {"a": 8}) is None  # not a check step
    plan = rule.decide(15, {"a": s}, {"a": 2}, {"a": 8})
    expected = next(k for k in range(2, 6) if explained_ratio(s, k) > 0.9)
    assert plan is not None and plan.kind == "grow" and plan.ranks == {"a": expected} and plan.capacities == {}
    assert rule.decide(20, {"a": s}, {"a": 5}, {"a": 8}) is None  # never shrinks, nothing new
    flat = torch.linspace(1.0, 0.9, 40)  # no k in [8, 12) explains 90%: grow to the buffer's end
    assert all(explained_ratio(flat, k) <= 0.9 for k in range(8, 12))
    grown = rule.decide(25, {"a": flat}, {"a": 8}, {"a": 8})
    assert grown.ranks == {"a": 12} and grown.capacities == {"a": 16}
    fixer = InRankGrowthRule(InRankConfig(fix_after=30), {"a": (64, 64)})
    plan = fixer.decide(30, {"a": s}, {"a": 6}, {"a": 8})
    assert plan.kind == "fix" and plan.ranks == {"a": 6} and fixer.done


def test_fixed_ratio():
    strategy = FixedRatioStrategy(FixedConfig(ratio=0.25, warmup_steps=20), {"a": (64, 64), "t": (2, 2)})
    assert strategy.observe(10, {}) is None
    plan = strategy.observe(20, {})
    assert plan.ranks == {"a": 16} and "t" not in plan.ranks
