"""Shard-aware monitor and coordinator on 2 real gloo ranks, against single-process exact values."""
from __future__ import annotations


import pytest
import torch

from tests.distributed.monitor_workers import (SHAPES, agree_worker, degenerate_worker, early_stop_worker,
                                               estimate_worker, failure_worker, make_matrices, near_threshold_worker)
from tests.dist_harness import run_ranks
from tests.distributed.switch_common import monitor_bytes, zero3_cuts_rows

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]


def exact_sranks() -> dict[str, float]:
    out = {}
    for i, w in enumerate(make_matrices()):
        s = torch.linalg.svdvals(w.double())
        out[f"l{i}"] = float((s ** 2).sum() / s[0] ** 2)
    return out


@pytest.mark.parametrize("layout", ["rows", "flat", "replicated"])
def test_sharded_estimates_match_exact_and_agree(layout):
    reference = exact_sranks()
    results = run_ranks(estimate_worker, args=(layout, "lanczos", 20), timeout=120)
    (r0, bytes0, _), (r1, _, _) = results
    assert r0 == r1, "ranks must hold identical estimates"
    for name, exact in reference.items():
        value, status = r0[name]
        assert status == "ok"
        assert abs(value - exact) / exact < 0.01, (name, value, exact)
    if layout != "replicated":
        # O(Σ(m+n)) bytes: one norm table + per Lanczos step an n-vector (WᵀW, whole rows) or an m- and an
        # n-vector (Golub–Kahan, rows cut by a partition: here only the 7x33 layer under "flat").
        cut = [layout == "flat" and zero3_cuts_rows(m, n) for m, n in SHAPES]
        assert cut == [False, False, layout == "flat", False]
        assert bytes0 == monitor_bytes(SHAPES, cut)
        assert bytes0 < 8 * sum(m * n for m, n in SHAPES)  # far below gathering the weights
    else:
        assert bytes0 == 8 * 4 * len(SHAPES)  # one shared result table


@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_early_stop_is_shared_by_every_rank_and_costs_no_extra_collective(layout):
    """monitor.rtol: every rank stops at the same Krylov step, before the 30-step budget, with the same
    estimates (within 1% of exact); the stop votes travel inside the steps' own all-reduces."""
    reference = exact_sranks()
    (r0, it0, calls0, bytes0), (r1, it1, calls1, _) = run_ranks(early_stop_worker, args=(layout, 1e-6), timeout=120)
    assert r0 == r1 and it0 == it1 and calls0 == calls1
    cut = [layout == "flat" and zero3_cuts_rows(m, n) for m, n in SHAPES]
    # WᵀW steps cost one all-reduce, Golub–Kahan steps (the 7x33 layer cut under "flat") two; + the norm table.
    gkl_steps = calls0 - 1 - it0
    gram_steps = it0 - gkl_steps
    assert 4 <= gram_steps < 30 and (0 < gkl_steps < 30 if any(cut) else gkl_steps == 0)
    whole_n = sum(n for (m, n), c in zip(SHAPES, cut) if not c)
    cut_mn = sum(m + n for (m, n), c in zip(SHAPES, cut) if c)
    # one vote slot rides on each step's first all-reduce: no collective of its own
    assert bytes0 == 8 * (3 * len(SHAPES) + gram_steps * (whole_n + 1) + gkl_steps * (cut_mn + 1))
    for name, exact in reference.items():
        assert r0[name][0] == pytest.approx(exact, rel=0.01), name


def test_degenerate_layers_named_and_identical():
    r0, r1 = run_ranks(degenerate_worker, timeout=120)
    assert r0 == r1
    assert r0["zero"] == ("zero", "zero")
    assert r0["nan"] == ("nonfinite", "nonfinite")
    good = torch.randn(8, 6, generator=torch.Generator().manual_seed(2)).double()
    s = torch.linalg.svdvals(good)
    assert abs(r0["good"][0] - float((s ** 2).sum() / s[0] ** 2)) < 1e-6


def test_plans_agree():
    results = run_ranks(agree_worker, args=(False,), timeout=60)
    assert results[0] == results[1] and results[0][0] == "ok"


def test_injected_disagreement_raises_named_error_on_every_rank():
    results = run_ranks(agree_worker, args=(True,), timeout=60)
    assert [r[0] for r in results] == ["PlanMismatchError", "PlanMismatchError"]
    assert "ranks [0]" in results[0][1] and "ranks [1]" in results[0][1]


def test_near_threshold_values_give_one_decision():
    """RELIABILITY scenario 1 through the real controller and strategy: alone, rank 1 (its copy 1e-7 under the
    threshold) would switch at step 3 and rank 0 at step 4; agreed on rank 0's values, both switch at 4, same ranks."""
    (switch0, alone0), (switch1, alone1) = run_ranks(near_threshold_worker, timeout=120)
    assert (alone0, alone1) == (4, 3), "the scripted values must straddle the threshold"
    assert switch0 == switch1 and switch0[0] == 4 and switch0[1] == {"net.2": 13}


def test_failure_on_one_rank_ends_every_rank_named():
    results = run_ranks(failure_worker, timeout=60)
    assert [r[0] for r in results] == ["RemoteRankError", "RemoteRankError"]
    assert all("rank(s) [1]" in r[1] and "injected factorization failure" in r[1] for r in results)


def test_layer_timing_decisions_are_shared():
    from tests.distributed.monitor_workers import profiling_worker

    (plan0, table0), (plan1, table1) = run_ranks(profiling_worker, timeout=120)
    assert plan0 == plan1 and table0 == table1  # times averaged over ranks: one decision
    assert set(table0) == {"a", "b", "c"}


@pytest.mark.parametrize("layout", ["rows", "flat", "replicated"])
def test_lowrank_singular_values_from_shards(layout):
    from tests.distributed.monitor_workers import spectrum_worker

    (s0, bytes0, calls0), (s1, _, _) = run_ranks(spectrum_worker, args=(layout,), timeout=120)
    assert s0 == s1
    gen = torch.Generator().manual_seed(5)
    u, v = torch.randn(37, 12, generator=gen), torch.randn(29, 12, generator=gen)
    u2, v2 = torch.randn(8, 16, generator=gen), torch.randn(50, 16, generator=gen)
    for got, (a, b, k) in zip(s0, [(u, v, 9), (u2, v2, 5)]):
        exact = torch.linalg.svdvals(a[:, :k].double() @ b[:, :k].double().T)[:k]
        assert torch.allclose(torch.tensor(got, dtype=torch.float64)[:k], exact, rtol=1e-8, atol=1e-9)
    if layout == "replicated":
        assert (bytes0, calls0) == (0, 0)
    else:  # one all-reduce: k² per factor plus 2·world boundary rows — O(r²), never a factor
        assert calls0 == 1
        assert bytes0 == 8 * sum(k * k + 4 * (c + 1) for k, c in [(9, 12), (5, 16), (9, 12), (5, 16)])
