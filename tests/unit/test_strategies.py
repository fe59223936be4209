"""Strategies: pure decisions on synthetic trajectories, predicted independently in each test."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from dist_lowrank.config import CuttlefishConfig, FixedConfig, InRankConfig, LowRankConfig
from dist_lowrank.linalg import explained_ratio
from dist_lowrank.plan import Plan
from dist_lowrank.errors import ConfigError
from dist_lowrank.methods import method_class
from dist_lowrank.methods.cuttlefish.rule import CuttlefishStrategy, ema, stability_score
from dist_lowrank.methods.dlrt.rule import CapacityRule
from dist_lowrank.methods.fixed.rule import FixedRatioStrategy
from dist_lowrank.methods.inrank.rule import InRankGrowthRule, next_capacity

pytestmark = pytest.mark.unit
DIMS = {"a": (64, 64), "b": (128, 32)}
# plateau, start value, time constant: "c" converges much later than "a" and "b"
CURVES = {"a": (10.0, 40.0, 30.0), "b": (6.0, 20.0, 30.0), "c": (12.0, 30.0, 90.0)}


def trajectory(step: int, name: str) -> float:
    """Decaying towards a plateau."""
    base, start, tau = CURVES[name]
    return base + (start - base) * math.exp(-step / tau)


def predicted_switch(cfg: CuttlefishConfig, dims, cadence: int, horizon: int) -> int:
    """Independent numpy computation of the switch step (reference relaxation: x2.5 / x5 for the last 2 / 1)."""
    alpha = 2 / (cfg.ema_window + 1)
    steps = list(range(cadence, horizon, cadence))
    stable = {n: False for n in dims}
    for i, step in enumerate(steps):
        unstable = sum(not s for s in stable.values())
        relax = {2: 2.5, 1: 5.0}.get(unstable, 1.0) if cfg.relax_threshold and unstable < len(dims) else 1.0
        for name in dims:
            xs = np.array([trajectory(s, name) for s in steps[: i + 1]])
            e = np.empty_like(xs)
            e[0] = xs[0]
            for t in range(1, len(xs)):
                e[t] = alpha * xs[t] + (1 - alpha) * e[t - 1]
            d = np.abs(np.diff(e))
            if len(d) >= cfg.last_k and d[-cfg.last_k:].mean() < cfg.threshold * relax:
                stable[name] = True
        if all(stable.values()) and step >= cfg.min_switch_step:
            return step
    return -1


def run_strategy(strategy, dims=DIMS, cadence=10, horizon=1000, stop_at=None):
    strategy.observe(0, {n: trajectory(0, n) for n in dims})
    for step in range(cadence, horizon, cadence):
        if stop_at is not None and step == stop_at:
            return None, strategy
        plan = strategy.observe(step, {n: trajectory(step, n) for n in dims})
        if plan is not None:
            return plan, strategy
    return None, strategy


def test_ema_and_score_by_hand():
    assert ema([1.0, 3.0, 3.0], 3) == [1.0, 2.0, 2.5]  # alpha = 0.5
    assert stability_score([1.0, 3.0, 3.0], 3, 2) == pytest.approx((1.0 + 0.5) / 2)
    assert stability_score([1.0, 3.0], 3, 2) is None  # one difference < last_k
    xs = np.random.default_rng(0).normal(10, 2, 40)
    e, alpha = [xs[0]], 2 / (15 + 1)
    for x in xs[1:]:
        e.append(alpha * x + (1 - alpha) * e[-1])
    assert ema(list(xs), 15) == pytest.approx(e, rel=1e-12)
    assert stability_score(list(xs), 15, 11) == pytest.approx(np.abs(np.diff(e))[-11:].mean(), rel=1e-12)


def test_xi_from_init_measurement():
    strategy = CuttlefishStrategy(CuttlefishConfig(), {"a": (64, 64), "b": (128, 32), "z": (8, 8), "n": (8, 8)})
    with pytest.warns(RuntimeWarning, match="n: non-finite"):
        assert strategy.observe(0, {"a": 16.0, "b": 5.0, "z": 0.0, "n": float("nan")}) is None
    assert strategy.xi == {"a": 64 / 16.0, "b": 32 / 5.0, "z": 1.0, "n": 1.0}  # srank 0 / NaN: xi = 1
    assert strategy.history == {"a": [], "b": [], "z": [], "n": []}  # the init value is not history
    assert strategy.choose_rank("a", 3.3) == math.ceil(4 * 3.3)


@pytest.mark.parametrize("min_switch_step", [0, 400])
def test_switch_at_predicted_step_with_scaled_ranks(min_switch_step):
    cfg = CuttlefishConfig(ema_window=5, last_k=4, threshold=0.2, relax_threshold=False,
                           min_switch_step=min_switch_step)
    plan, strategy = run_strategy(CuttlefishStrategy(cfg, DIMS))
    expected_step = predicted_switch(cfg, DIMS, 10, 1000)
    assert plan is not None and plan.kind == "switch" and plan.step == expected_step > 0
    assert (expected_step == 400) == (min_switch_step == 400)  # the natural switch comes earlier
    for name, (m, n) in DIMS.items():
        expected = math.ceil(min(m, n) / trajectory(0, name) * trajectory(plan.step, name))
        assert plan.ranks[name] == expected and "all layers stable" in plan.reasons[name]
    assert strategy.done and strategy.observe(plan.step + 10, {"a": 1.0, "b": 1.0}) is None


def test_relaxation_follows_reference_and_switches_earlier():
    dims = {"a": (64, 64), "b": (128, 32), "c": (64, 64)}
    strict = CuttlefishConfig(ema_window=5, last_k=4, threshold=0.05, relax_threshold=False)
    relaxed = CuttlefishConfig(ema_window=5, last_k=4, threshold=0.05, relax_threshold=True)
    strict_plan, _ = run_strategy(CuttlefishStrategy(strict, dims), dims)
    relaxed_plan, _ = run_strategy(CuttlefishStrategy(relaxed, dims), dims)
    assert strict_plan.step == predicted_switch(strict, dims, 10, 1000)
    assert relaxed_plan.step == predicted_switch(relaxed, dims, 10, 1000) < strict_plan.step
    strategy = CuttlefishStrategy(relaxed, dims)
    bars = [strategy.threshold()]
    for name in dims:
        strategy.stable[name] = True
        bars.append(strategy.threshold())
    assert bars == pytest.approx([0.05, 0.05 * 2.5, 0.05 * 5, 0.05 * 5])  # 3, 2, 1, 0 layers unstable
    alone = CuttlefishStrategy(relaxed, {"a": (8, 8)})
    assert alone.threshold() == 0.05  # a single layer is no straggler: not relaxed while none is stable


def test_raw_rule_floor_cap_and_no_saving_exclusion():
    cfg = CuttlefishConfig(rank_rule="raw", floor_fraction=0.25, relax_threshold=False, threshold=0.2)
    strategy = CuttlefishStrategy(cfg, {"a": (64, 64), "tiny": (4, 4)}, min_rank=3)
    strategy.observe(0, {"a": 2.0, "tiny": 1.0})  # xi is ignored by the raw rule
    assert strategy.choose_rank("a", 3.2) == 16  # floor 0.25 * 64
    assert strategy.choose_rank("a", 30.2) == 31
    assert strategy.choose_rank("a", 500.0) == 64  # capped at full rank
    assert strategy.choose_rank("tiny", 0.2) == 3  # min_rank beats ceil(0.25 * 4) = 1
    scaled = CuttlefishStrategy(CuttlefishConfig(max_switch_step=30), {"a": (64, 64), "tiny": (4, 4), "w": (64, 64)})
    scaled.observe(0, {"a": 20.0, "tiny": 3.0, "w": 2.0})  # xi_a = 64 / 20, xi_w = 32
    assert scaled.observe(10, {"a": 5.0, "tiny": 3.0, "w": 1.5}) is None
    assert scaled.observe(20, {"a": 9.0, "tiny": 3.0, "w": 1.5}) is None
    plan = scaled.observe(30, {"a": 7.0, "tiny": 3.0, "w": 1.5})
    assert plan is not None and plan.step == 30 and plan.ranks == {"a": math.ceil(64 / 20 * 7.0)}
    assert "forced" in plan.reasons["a"]
    assert "tiny" not in plan.ranks and "saves no parameters" in plan.reasons["tiny"]  # 3 >= 16/8
    assert "saves no parameters" in plan.reasons["w"]  # ceil(32 * 1.5) = 48 >= 64*64/128 = 32


def test_search_above_saving_plans_the_last_saving_rank_with_the_raw_floor():
    """A layer whose scaled rank saves nothing is handed to the rank search at max_saving_rank with floor
    ceil(srank) — only when that floor itself saves parameters; otherwise it stays dense as before."""
    cfg = CuttlefishConfig(max_switch_step=10, search_above_saving=True)
    strategy = CuttlefishStrategy(cfg, {"w": (64, 64), "narrow": (64, 64)})
    strategy.observe(0, {"w": 2.0, "narrow": 2.0})  # xi = 32 for both
    plan = strategy.observe(10, {"w": 1.5, "narrow": 40.0})  # scaled ranks 48 and 64: neither saves (>= 32)
    assert plan is not None and plan.ranks == {"w": 31} and plan.floors == {"w": 2}  # 31 = (64*64 - 1) // 128
    assert "48 capped at the last rank that saves parameters" in plan.reasons["w"]
    assert "narrow" not in plan.ranks and "saves no parameters" in plan.reasons["narrow"]  # floor 40 >= 32


def test_nonconverging_switches_only_when_forced():
    oscillating = {"a": lambda s: 2.0 + (s // 10 % 2), "b": lambda s: 2.0}
    free = CuttlefishStrategy(CuttlefishConfig(threshold=0.01, relax_threshold=False), DIMS)
    free.observe(0, {"a": 10.0, "b": 10.0})
    for step in range(10, 500, 10):
        assert free.observe(step, {n: f(step) for n, f in oscillating.items()}) is None
    assert free.stable == {"a": False, "b": True} and not free.done
    forced = CuttlefishStrategy(CuttlefishConfig(threshold=0.01, relax_threshold=False, max_switch_step=255), DIMS)
    forced.observe(0, {"a": 10.0, "b": 10.0})
    plans = [(s, forced.observe(s, {n: f(s) for n, f in oscillating.items()})) for s in range(10, 500, 10)]
    emitted = [(s, p) for s, p in plans if p is not None]
    assert len(emitted) == 1 and emitted[0][0] == emitted[0][1].step == 260  # first cadence step >= 255
    plan = emitted[0][1]
    assert plan.ranks == {"a": math.ceil(64 / 10 * 2.0), "b": math.ceil(32 / 10 * 2.0)} and forced.done
    assert all("forced" in r for r in plan.reasons.values()) and "not stable" in plan.reasons["a"]


def test_nan_observation_is_skipped_and_warned_once():
    cfg = CuttlefishConfig(ema_window=5, last_k=4, threshold=0.2, relax_threshold=False)
    clean, _ = run_strategy(CuttlefishStrategy(cfg, DIMS))
    noisy = CuttlefishStrategy(cfg, DIMS)
    noisy.observe(0, {n: trajectory(0, n) for n in DIMS})
    plan = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(10, 1000, 10):
            # extra measurements in between where both layers are non-finite ("nonfinite" status)
            assert noisy.observe(step - 5, {"a": float("nan"), "b": float("inf")}) is None
            plan = noisy.observe(step, {n: trajectory(step, n) for n in DIMS})
            if plan is not None:
                break
    assert plan == clean  # the NaNs never entered the EMA
    assert sorted(str(w.message).split(":")[0] for w in caught) == ["a", "b"]  # once per layer
    one_bad = CuttlefishStrategy(cfg, DIMS)
    one_bad.observe(0, {n: trajectory(0, n) for n in DIMS})
    with pytest.warns(RuntimeWarning):
        one_bad.observe(10, {"a": float("nan"), "b": 7.0})
    assert one_bad.history == {"a": [], "b": [7.0]}


@pytest.mark.parametrize("relax", [False, True])
def test_resume_mid_trajectory_gives_identical_plan(relax):
    cfg = CuttlefishConfig(ema_window=5, last_k=4, threshold=0.2, relax_threshold=relax)
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
    assert uninterrupted is not None and plan == uninterrupted and plan.digest() == uninterrupted.digest()
    assert json.loads(json.dumps(resumed.state_dict())) == resumed.state_dict()


def test_plan_digest_is_deterministic():
    cfg = CuttlefishConfig(ema_window=5, last_k=4, threshold=0.2)
    p1, _ = run_strategy(CuttlefishStrategy(cfg, DIMS))
    p2, _ = run_strategy(CuttlefishStrategy(cfg, dict(reversed(list(DIMS.items())))))  # dict order irrelevant
    assert p1.digest() == p2.digest() and Plan.from_json(p1.to_json()) == p1
    p3, _ = run_strategy(CuttlefishStrategy(CuttlefishConfig(ema_window=5, last_k=4, threshold=0.3), DIMS))
    assert p3.digest() != p1.digest()


def test_next_capacity_is_geometric():
    assert next_capacity(8, 8, 1.5, 8, 100) == 8
    assert next_capacity(8, 9, 1.5, 8, 100) == 16
    assert next_capacity(16, 40, 1.5, 8, 100) == 40
    assert next_capacity(64, 65, 1.5, 8, 70) == 70  # capped where factorizing stops saving
    cap, reshards = 8, 0
    for needed in range(1, 257):
        new = next_capacity(cap, needed, 1.5, 8, 1000)
        assert new >= needed and new % 8 == 0
        reshards += new != cap
        cap = new
    assert reshards <= math.ceil(math.log(256 / 8, 1.5)) + 1


def near_flat(width: int) -> torch.Tensor:
    """A spectrum no prefix explains: g(k) < tau for every k < width, so the rule grows by the whole buffer."""
    return torch.linspace(1.0, 0.99, width, dtype=torch.float64)


def test_inrank_growth_decisions():
    cfg = InRankConfig(warmup=10, gap=5, tau=0.9, buffer=4, init_rank=2)
    rule = InRankGrowthRule(cfg, {"a": (64, 64)})
    s = torch.tensor([5.0, 4.0, 3.5, 3.0, 0.1, 0.05])
    assert rule.decide(5, {"a": s}, {"a": 2}, {"a": 8}) is None  # before warm-up
    assert rule.decide(12, {"a": s}, {"a": 2}, {"a": 8}) is None  # not a check step
    plan = rule.decide(15, {"a": s}, {"a": 2}, {"a": 8})
    expected = next(k for k in range(2, 6) if explained_ratio(s, k) > 0.9)
    assert plan is not None and plan.kind == "grow" and plan.ranks == {"a": expected} and plan.capacities == {}
    assert rule.decide(20, {"a": s}, {"a": 5}, {"a": 8}) is None  # nothing new
    flat = torch.linspace(1.0, 0.9, 40)  # no k in [8, 12) explains 90%: grow to the buffer's end
    assert all(explained_ratio(flat, k) <= 0.9 for k in range(8, 12))
    grown = rule.decide(25, {"a": flat}, {"a": 8}, {"a": 8})
    assert grown.ranks == {"a": 12} and grown.capacities == {"a": 16}  # width 12 + 4 fits 16 = 8 * 1.5 -> 16


def test_inrank_ranks_never_shrink_and_stay_under_the_saving_cap():
    rule = InRankGrowthRule(InRankConfig(warmup=0, gap=1, tau=0.5, buffer=8), {"a": (64, 64), "s": (10, 10)})
    steep = torch.tensor([100.0] + [0.01] * 15)
    assert explained_ratio(steep, 1) > 0.5  # the spectrum alone would say rank 1
    assert rule.decide(1, {"a": steep}, {"a": 6}, {"a": 16}) is None
    flat = torch.ones(12) + torch.linspace(0, 1e-3, 12).flip(0)
    plan = rule.decide(2, {"s": flat}, {"s": 3}, {"s": 4})
    assert plan.ranks == {"s": 4} and plan.capacities == {}  # cap (100 - 1) // 20 = 4 < 3 + 8
    assert rule.decide(3, {"s": flat}, {"s": 4}, {"s": 4}) is None


def test_inrank_capacity_reshards_logarithmically():
    cfg = InRankConfig(warmup=0, gap=1, tau=0.9, buffer=8, growth_factor=1.5, capacity_multiple=8, init_rank=4)
    rule, m = InRankGrowthRule(cfg, {"a": (2048, 2048)}), 2048
    rank, capacity, reshards = 4, 16, 0
    for step in range(1, 400):
        width = min(rank + cfg.buffer, 1023)
        plan = rule.decide(step, {"a": near_flat(width)}, {"a": rank}, {"a": capacity})  # always grows
        if plan is None:
            break
        rank = plan.ranks["a"]
        if "a" in plan.capacities:
            capacity, reshards = plan.capacities["a"], reshards + 1
        assert min(rank + cfg.buffer, 1023) <= capacity <= 1023  # holds the trained width, never past the cap
    assert rank == 1023 == m * m // (2 * m) - 1  # grew to the saving cap, then stopped
    assert 1 < reshards <= math.ceil(math.log(1023 / 16, 1.5)) + 1


def test_inrank_nonfinite_spectrum_is_skipped():
    rule = InRankGrowthRule(InRankConfig(warmup=0, gap=1, buffer=4), {"a": (64, 64), "b": (64, 64)})
    bad = torch.tensor([1.0, float("nan"), 0.5])
    with pytest.warns(RuntimeWarning, match="a: non-finite"):
        plan = rule.decide(1, {"a": bad, "b": near_flat(6)}, {"a": 2, "b": 2}, {"a": 8, "b": 8})
    assert plan.ranks == {"b": 6}


def test_inrank_fix_and_state_round_trip():
    cfg = InRankConfig(warmup=0, gap=5, fix_after=30, fold_on_fix=True, buffer=4)
    rule = InRankGrowthRule(cfg, {"a": (64, 64)})
    assert rule.observe(5, {"a": 3.0}) is None  # spectra, not stable ranks, drive InRank
    assert rule.decide(5, {"a": near_flat(6)}, {"a": 2}, {"a": 8}).ranks == {"a": 6}
    resumed = InRankGrowthRule(cfg, {"a": (64, 64)})
    resumed.load_state_dict(json.loads(json.dumps(rule.state_dict())))
    assert resumed.decisions == rule.decisions and not resumed.done
    for r in (rule, resumed):
        plan = r.decide(30, {}, {"a": 6}, {"a": 16})
        assert plan == Plan("fix", 30, {"a": 6}) and r.done
        assert r.decide(35, {"a": near_flat(10)}, {"a": 6}, {"a": 16}) is None
    done = InRankGrowthRule(cfg, {"a": (64, 64)})
    done.load_state_dict(json.loads(json.dumps(rule.state_dict())))
    assert done.done and done.decide(40, {}, {"a": 6}, {"a": 16}) is None


def test_fixed_ratio():
    strategy = FixedRatioStrategy(FixedConfig(ratio=0.25, warmup_steps=20), {"a": (64, 64), "b": (6, 200),
                                                                            "t": (2, 2)}, min_rank=3)
    assert strategy.observe(0, {}) is None and strategy.observe(10, {}) is None
    state = json.loads(json.dumps(strategy.state_dict()))
    plan = strategy.observe(20, {})
    assert plan.kind == "switch" and plan.ranks == {"a": 16, "b": 3}  # b: ceil(1.5) = 2 < min_rank 3
    assert "t" not in plan.ranks and "saves no parameters" in plan.reasons["t"]
    assert strategy.done and strategy.observe(30, {}) is None
    resumed = FixedRatioStrategy(FixedConfig(ratio=0.25, warmup_steps=20), {"a": (64, 64), "b": (6, 200),
                                                                           "t": (2, 2)}, min_rank=3)
    resumed.load_state_dict(state)
    assert resumed.observe(25, {}) == Plan("switch", 25, plan.ranks, reasons=plan.reasons)
    no_warmup = FixedRatioStrategy(FixedConfig(ratio=0.4, warmup_steps=0), {"a": (64, 64)})
    assert no_warmup.observe(0, {}) is None and no_warmup.observe(1, {}).ranks == {"a": 26}  # 0 = init


def test_method_registry():
    """Each lowrank.strategy value reaches its method folder's rule, with the config's settings."""
    dims = {"a": (64, 64)}
    assert method_class("none") is None
    cuttlefish = method_class("cuttlefish").make_rule(LowRankConfig(strategy="cuttlefish", min_rank=5), dims)
    assert isinstance(cuttlefish, CuttlefishStrategy) and cuttlefish.min_rank == 5
    assert isinstance(method_class("fixed").make_rule(LowRankConfig(strategy="fixed"), dims), FixedRatioStrategy)
    inrank = method_class("inrank")(LowRankConfig(strategy="inrank", inrank=InRankConfig(tau=0.7)), {}, dims).rule
    assert isinstance(inrank, InRankGrowthRule) and inrank.cfg.tau == 0.7
    dlrt = method_class("dlrt")(LowRankConfig(strategy="dlrt"), {}, dims).rule
    assert isinstance(dlrt, CapacityRule) and dlrt.max_ranks == {"a": 32}  # min(m, n) / 2 by default
    with pytest.raises(ConfigError, match=r"lowrank.strategy: got 'bogus'; allowed: cuttlefish, dlrt, fixed, inrank, tensor, none"):
        method_class("bogus")
