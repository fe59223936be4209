"""`lowrank.cuttlefish.preset: reference` against the published detector's rules, each on a history built by hand.

The expected scores are written here from the reference's definitions (EMA with e₀ = x₀, numpy-style central
differences, one-sided at the ends, the mean of the last k), not taken from the code under test."""
from __future__ import annotations

import math

import pytest

from dist_lowrank.methods.cuttlefish.config import CuttlefishConfig
from dist_lowrank.methods.cuttlefish.reference import ReferenceCuttlefishStrategy, gradient_score

pytestmark = pytest.mark.unit
CFG = CuttlefishConfig(preset="reference")


def _ema(history, window=15):
    alpha, e = 2 / (window + 1), []
    for x in history:
        e.append(float(x) if not e else alpha * x + (1 - alpha) * e[-1])
    return e


def by_hand(history: list[int], window: int = 15, last_k: int = 11) -> float:
    e = _ema(history, window)
    n = len(e)
    grad = [e[1] - e[0]] + [(e[i + 1] - e[i - 1]) / 2 for i in range(1, n - 1)] + [e[-1] - e[-2]]
    tail = [abs(g) for g in grad][-last_k:]
    return sum(tail) / len(tail)


def feed(strategy, histories: dict[str, list[float]]):
    """Epoch e of every history at step 10·e (epoch 0 = the init measurement); returns (epoch, plan) of the
    plan, and the stable set after each epoch."""
    stable_after = []
    for epoch in range(len(next(iter(histories.values())))):
        plan = strategy.observe(10 * epoch, {n: h[epoch] for n, h in histories.items()})
        stable_after.append({n for n, s in strategy.stable.items() if s})
        if plan is not None:
            return epoch, plan, stable_after
    return None, None, stable_after


def test_the_score_is_the_central_difference_mean_and_not_the_backward_one():
    history = [5] * 10 + [6, 6, 8, 8, 9, 9, 9, 12]
    assert gradient_score(history, 15, 11) == pytest.approx(by_hand(history), abs=1e-12)
    e = _ema(history)
    back = [abs(b - a) for a, b in zip(e, e[1:])][-11:]
    assert abs(sum(back) / 11 - by_hand(history)) > 1e-3  # the two rules differ on this history


def test_no_layer_is_stable_before_a_full_window_and_the_switch_comes_one_epoch_later():
    """A flat history (score 0) is not stable until epoch 15; the switch is the plan of epoch 16, with its ranks."""
    flat = [20.7] * 30
    epoch, plan, stable_after = feed(ReferenceCuttlefishStrategy(CFG, {"a": (64, 64)}), {"a": flat})
    assert all(not s for s in stable_after[:15]) and stable_after[15] == {"a"}
    assert epoch == 16 and plan.step == 160
    assert plan.ranks == {"a": 64}  # ξ = 64 / int(20.7) = 3.2: int(20·3.2) = 64 is not > 64 → ceil(64.0) = 64


def test_sranks_are_truncated_at_init_and_the_rank_rule_is_the_references():
    """ξ = full / int(srank₀); rank = full if int(srank·ξ) > full else ceil(srank·ξ); also where it saves nothing."""
    dims = {"wide": (64, 64), "over": (64, 64), "tiny": (8, 8)}
    histories = {"wide": [31.9] + [5.5] * 59, "over": [7.9] + [10.6] * 59, "tiny": [3.2] + [2.7] * 59}
    epoch, plan, _ = feed(ReferenceCuttlefishStrategy(CFG, dims), histories)
    assert epoch is not None
    assert plan.ranks["wide"] == math.ceil(5 * 64 / 31)         # int sranks: 5 and 31 → 10.32 → 11
    assert plan.ranks["over"] == 64                              # int(10 · 64/7) = 91 > 64
    assert plan.ranks["tiny"] == math.ceil(2 * 8 / 3) == 6       # 6 ≥ 8·8/16: no saving, factorized all the same
    raw = ReferenceCuttlefishStrategy(CuttlefishConfig(preset="reference", rank_rule="raw"), dims)
    assert feed(raw, histories)[1].ranks == {"wide": 5, "over": 64, "tiny": 2}


def test_relaxation_counts_the_remaining_layers_before_the_epochs_updates():
    """Layers a, b are flat, c moves with a score between 0.1 and 0.5: at epoch 15 three remain (bar 0.1), so c is
    not stable although a, b become stable in the same epoch; at epoch 16 one remains (bar 0.5), c is stable."""
    c = [10.0] * 12 + [11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 18.0]
    score15, score16 = by_hand([int(x) for x in c[:16]]), by_hand([int(x) for x in c[:17]])
    assert 0.1 < score15 <= 0.5 and 0.1 < score16 <= 0.5
    dims = {"a": (32, 32), "b": (32, 32), "c": (32, 32)}
    histories = {"a": [9.0] * 20, "b": [9.0] * 20, "c": c}
    epoch, plan, stable_after = feed(ReferenceCuttlefishStrategy(CFG, dims), histories)
    assert stable_after[15] == {"a", "b"} and stable_after[16] == {"a", "b", "c"}
    assert epoch == 17


def test_two_tracked_layers_are_relaxed_from_the_start_and_le_is_inclusive():
    """With two layers both unstable the bar is 0.1·2.5 at once; a score equal to the bar counts as stable."""
    c = [10.0] * 12 + [11.0, 12.0, 13.0, 14.0, 15.0, 16.0]
    score = by_hand([int(x) for x in c[:16]])
    assert 0.1 < score <= 0.25
    dims = {"a": (32, 32), "c": (32, 32)}
    _, _, stable_after = feed(ReferenceCuttlefishStrategy(CFG, dims), {"a": [9.0] * 18, "c": c})
    assert stable_after[15] == {"a", "c"}
    exact = CuttlefishConfig(preset="reference", threshold=score / 2.5)  # the relaxed bar equals the score
    _, _, stable_after = feed(ReferenceCuttlefishStrategy(exact, dims), {"a": [9.0] * 18, "c": c})
    assert "c" in stable_after[15]
    below = CuttlefishConfig(preset="reference", threshold=score / 2.5 * (1 - 1e-9))
    _, _, stable_after = feed(ReferenceCuttlefishStrategy(below, dims), {"a": [9.0] * 18, "c": c})
    assert "c" not in stable_after[15]


def test_the_state_round_trips_mid_history():
    histories = {"a": [20.0] * 10}
    first = ReferenceCuttlefishStrategy(CFG, {"a": (64, 64)})
    feed(first, histories)
    second = ReferenceCuttlefishStrategy(CFG, {"a": (64, 64)})
    second.load_state_dict(first.state_dict())
    assert second.state_dict() == first.state_dict()


def test_the_preset_is_what_the_method_and_dlrts_warm_up_use():
    from dist_lowrank.config import LowRankConfig
    from dist_lowrank.config_io import dataclass_from_dict
    from dist_lowrank.methods.cuttlefish.method import CuttlefishMethod
    from dist_lowrank.methods.cuttlefish.rule import CuttlefishStrategy

    cfg = dataclass_from_dict(LowRankConfig, {"strategy": "cuttlefish", "cuttlefish": {"preset": "reference"}},
                              "lowrank")
    assert type(CuttlefishMethod.make_rule(cfg, {"a": (8, 8)})) is ReferenceCuttlefishStrategy
    cfg.cuttlefish.preset = "default"
    assert type(CuttlefishMethod.make_rule(cfg, {"a": (8, 8)})) is CuttlefishStrategy
