"""linalg against numpy/scipy oracles: stable rank, Krylov σ_max, explained ratio, truncated SVD."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dist_lowrank.linalg import (as_matrix, explained_ratio, explained_variance_rank, sigma_max_batched, sigma_max_gram,
                                 stable_rank, truncated_svd_factors)

pytestmark = pytest.mark.unit


def np_svals(w: np.ndarray) -> np.ndarray:
    return np.linalg.svd(w.reshape(w.shape[0], -1).astype(np.float64), compute_uv=False)


def np_srank(w: np.ndarray) -> float:
    s = np_svals(w)
    return float((s ** 2).sum() / s[0] ** 2)


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """Random orthogonal bases around a given spectrum (fp64)."""
    gen = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    k = s.numel()
    return q1[:, :k] @ torch.diag(s.double()) @ q2[:k]


def weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(300, 8, generator=gen) @ torch.randn(8, 200, generator=gen)
    return {
        "gauss_256x768": torch.randn(256, 768, generator=gen),
        "gauss_768x256": torch.randn(768, 256, generator=gen),
        "gauss_512x512": torch.randn(512, 512, generator=gen),
        "conv_64x32x3x3": torch.randn(64, 32, 3, 3, generator=gen),
        "lowrank_plus_noise": low + 0.05 * torch.randn(300, 200, generator=gen),
        "decaying": with_spectrum(200, 150, torch.linspace(1, 0.01, 150) ** 2, seed=1),
    }


WEIGHTS = weights()


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_exact_matches_numpy_and_lanczos_is_within_one_percent(name):
    w = WEIGHTS[name]
    oracle = np_srank(w.numpy())
    exact = stable_rank(w, "exact")
    assert exact.status == "ok"
    assert exact.value == pytest.approx(oracle, rel=1e-10)
    assert exact.fro_sq == pytest.approx(float((w.double() ** 2).sum()), rel=1e-12)
    assert exact.sigma_max == pytest.approx(float(np_svals(w.numpy())[0]), rel=1e-12)
    lanczos = stable_rank(w, "lanczos", 20)
    assert lanczos.status == "ok"
    assert abs(lanczos.value - oracle) / oracle < 0.01
    assert lanczos.value >= oracle * (1 - 1e-12)  # Ritz values never exceed σ_max: srank from above


def test_as_matrix_shapes_and_dtype():
    conv = torch.randn(8, 3, 5, 2)
    assert as_matrix(conv).shape == (8, 30) and as_matrix(conv).dtype == torch.float64
    assert torch.equal(as_matrix(conv), conv.reshape(8, 30).double())
    assert as_matrix(torch.arange(4.0)).shape == (1, 4)
    assert as_matrix(torch.randn(3, 4).to(torch.bfloat16)).dtype == torch.float64


def test_power_iteration_converges_on_gapped_spectrum():
    s = torch.cat([torch.tensor([10.0, 3.0]), torch.linspace(1, 0.1, 78)])
    w = with_spectrum(100, 80, s, seed=2)
    oracle = np_srank(w.numpy())
    errors = [abs(stable_rank(w, "power", k).value - oracle) / oracle for k in (2, 5, 30)]
    assert errors[2] < 1e-9  # gap 10/3: (0.3)^(2·30) ≈ 1e-31
    assert errors[0] > errors[1] > errors[2]


def test_zero_and_nonfinite_have_named_results_for_every_method():
    for method in ("exact", "lanczos", "power"):
        zero = stable_rank(torch.zeros(5, 7), method)
        assert (zero.value, zero.fro_sq, zero.sigma_max, zero.status) == (0.0, 0.0, 0.0, "zero")
        for bad in (float("nan"), float("inf"), float("-inf")):
            w = torch.randn(6, 4)
            w[2, 3] = bad
            res = stable_rank(w, method)
            assert res.status == "nonfinite" and math.isnan(res.value) and math.isnan(res.sigma_max)
    with pytest.raises(ValueError, match="method"):
        stable_rank(torch.randn(3, 3), "svd")


@pytest.mark.parametrize("method", ["exact", "lanczos", "power"])
def test_rank_one_and_vectors_have_srank_one(method):
    gen = torch.Generator().manual_seed(3)
    rank1 = torch.randn(40, 1, generator=gen) @ torch.randn(1, 30, generator=gen)
    for w in (rank1, torch.randn(1, 9, generator=gen), torch.randn(9, 1, generator=gen), torch.randn(17, generator=gen)):
        res = stable_rank(w, method, 20)
        assert res.value == pytest.approx(1.0, rel=1e-9)
        assert res.sigma_max == pytest.approx(float(np_svals(as_matrix(w).numpy())[0]), rel=1e-9)


@pytest.mark.parametrize("method", ["exact", "lanczos"])
def test_ill_conditioned_and_badly_scaled(method):
    s = torch.cat([torch.tensor([1.0, 0.5]), torch.full((38,), 1e-12)])
    w = with_spectrum(50, 40, s, seed=4)
    oracle = np_srank(w.numpy())
    assert stable_rank(w, method).value == pytest.approx(oracle, rel=1e-9)
    for scale in (1e-150, 1e150):  # ‖W‖_F² under/overflows in fp64; srank must not
        assert stable_rank(w * scale, method).value == pytest.approx(oracle, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["exact", "lanczos"])
def test_half_precision_is_computed_in_fp64(dtype, method):
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(5)).to(dtype)
    oracle = np_srank(w.float().numpy())
    assert stable_rank(w, method, steps=48).value == pytest.approx(oracle, rel=1e-9)  # 48 = min(m, n): exact


def _operators(mats: list[torch.Tensor], log: dict):
    def apply_a(vs):
        log["a"] += 1
        assert [v.numel() for v in vs] == [m.shape[1] for m in mats]
        return [m @ v for m, v in zip(mats, vs)]

    def apply_at(us):
        log["at"] += 1
        assert [u.numel() for u in us] == [m.shape[0] for m in mats]
        return [m.T @ u for m, u in zip(mats, us)]

    return apply_a, apply_at


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_batched_lockstep_equals_separate_and_is_deterministic(method):
    gen = torch.Generator().manual_seed(6)
    mats = [torch.randn(96, 160, generator=gen, dtype=torch.float64), as_matrix(WEIGHTS["conv_64x32x3x3"]),
            torch.randn(3, 5, generator=gen, dtype=torch.float64),  # breaks down after 3 steps
            torch.randn(7, 1, generator=gen, dtype=torch.float64) @ torch.randn(1, 6, generator=gen, dtype=torch.float64),
            torch.zeros(4, 9, dtype=torch.float64),  # stops at once; still fed zeros in lockstep
            with_spectrum(120, 80, torch.linspace(1, 0.01, 80) ** 2, seed=10)]
    dims = [tuple(m.shape) for m in mats]
    log = {"a": 0, "at": 0}
    together = sigma_max_batched(*_operators(mats, log), dims, method=method, steps=20)
    assert log == {"a": 20, "at": 20}
    for m, value in zip(mats, together):
        alone_log = {"a": 0, "at": 0}
        alone = sigma_max_batched(*_operators([m], alone_log), [tuple(m.shape)], method=method, steps=20)
        assert alone_log == {"a": 20, "at": 20}
        assert value == alone[0]  # bit for bit: no cross-talk between layers
    exact = [float(np_svals(m.numpy())[0]) for m in mats]
    if method == "lanczos":
        for value, ref in zip(together, exact):
            assert value == pytest.approx(ref, rel=1e-4, abs=1e-12)
    again = sigma_max_batched(*_operators(mats, {"a": 0, "at": 0}), dims, method=method, steps=20)
    assert again == together  # deterministic, bit for bit


def test_batched_isolates_nonfinite_layer_and_checks_operator_output():
    good = torch.randn(200, 150, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    bad = torch.randn(6, 5, dtype=torch.float64)
    bad[1, 1] = float("nan")
    mats = [good, bad]
    out = sigma_max_batched(*_operators(mats, {"a": 0, "at": 0}), [(200, 150), (6, 5)], steps=15)
    alone = sigma_max_batched(*_operators([good], {"a": 0, "at": 0}), [(200, 150)], steps=15)
    assert out[0] == alone[0] and math.isnan(out[1])
    with pytest.raises(ValueError, match="apply_a: layer 0"):
        sigma_max_batched(lambda vs: [torch.zeros(3)], lambda us: us, [(4, 4)], steps=2)
    with pytest.raises(ValueError, match="steps"):
        sigma_max_batched(lambda vs: vs, lambda us: us, [(4, 4)], steps=0)


def test_lanczos_beats_power_at_equal_cost_on_flat_spectrum():
    w = as_matrix(WEIGHTS["gauss_512x512"])
    oracle = np_srank(w.numpy())
    lanczos = abs(stable_rank(w, "lanczos", 10).value - oracle) / oracle
    power = abs(stable_rank(w, "power", 10).value - oracle) / oracle
    assert lanczos < power


def _np_explained(s: np.ndarray, k: int) -> float:
    kept = s.copy()
    kept[k:] = 0
    return float(1 - np.var(s - kept) / np.var(s))


def test_explained_ratio_matches_numpy():
    spectra = [np.array([5.0, 3.0, 1.0, 0.5, 0.1]), np.array([10.0, 1.0, 1.0, 1.0]),
               np.sort(np.random.default_rng(7).gamma(2.0, size=30))[::-1].copy()]
    for sn in spectra:
        s = torch.tensor(sn)
        for k in range(len(sn) + 1):
            assert explained_ratio(s, k) == pytest.approx(_np_explained(sn, k), rel=1e-12, abs=1e-12)
        assert explained_ratio(s, 0) == pytest.approx(0.0, abs=1e-12)
        assert explained_ratio(s, len(sn)) == 1.0
    # Hand-made: s = (3, 1): var(s) = 1, s − s_{:1} = (0, 1) has var 0.25, so g(1) = 0.75.
    assert explained_ratio(torch.tensor([3.0, 1.0]), 1) == pytest.approx(0.75)
    assert explained_ratio(torch.ones(4), 1) == 1.0 and explained_ratio(torch.tensor([2.0]), 0) == 1.0
    with pytest.raises(ValueError, match="k"):
        explained_ratio(torch.ones(3), -1)


def test_explained_variance_rank_first_k_above_tau_else_stop():
    sn = np.array([5.0, 3.0, 1.0, 0.5, 0.1, 0.05])
    s = torch.tensor(sn)
    for tau in (0.5, 0.9, 0.99):
        expected = next((k for k in range(1, 5) if _np_explained(sn, k) > tau), 5)
        assert explained_variance_rank(s, tau, 1, 5) == expected
    assert explained_variance_rank(s, 0.9, 4, 6) == 4  # g is increasing: start already qualifies
    assert explained_variance_rank(s, 0.9999999, 0, 2) == 2  # none qualifies: stop
    assert explained_variance_rank(s, 0.5, 3, 3) == 3  # empty range: stop


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_truncated_svd_error_is_the_tail(dtype):
    w = torch.randn(60, 40, generator=torch.Generator().manual_seed(8)).to(dtype)
    wd = w.double()
    s = np.linalg.svd(wd.numpy(), compute_uv=False)
    for r in (1, 7, 25):
        a, b = truncated_svd_factors(w, r)
        assert a.shape == (60, r) and b.shape == (r, 40) and a.dtype == dtype and b.dtype == dtype
        if dtype == torch.float64:
            err = float(torch.linalg.norm(wd - a @ b))
            assert err == pytest.approx(float(np.sqrt((s[r:] ** 2).sum())), rel=1e-8)
            assert torch.allclose(a.T @ a, b @ b.T, atol=1e-10)  # balanced: both equal Σ
    a, b = truncated_svd_factors(w, 40)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    assert float((a.double() @ b.double() - wd).abs().max()) < tol * float(wd.abs().max())


def test_truncated_svd_rank_clip_signs_and_errors():
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(30, 12, generator=gen, dtype=torch.float64)
    a, b = truncated_svd_factors(w, 100)
    assert a.shape == (30, 12) and b.shape == (12, 12)
    assert torch.allclose(a @ b, w, atol=1e-12)
    a1, b1 = truncated_svd_factors(w, 5)
    pivots = a1.abs().argmax(dim=0)
    assert bool((a1[pivots, torch.arange(5)] > 0).all())
    a2, b2 = truncated_svd_factors(w.clone(), 5)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    a3, _ = truncated_svd_factors(-w, 5)  # flipping W flips V's signs, not U's: U stays pinned
    assert torch.allclose(a3, a1, atol=1e-12)
    with pytest.raises(ValueError, match="rank"):
        truncated_svd_factors(w, 0)
    with pytest.raises(ValueError, match="2-D"):
        truncated_svd_factors(torch.randn(2, 3, 4), 1)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        truncated_svd_factors(bad, 2)


def test_rtol_stops_early_only_when_settled_and_all_ranks_agree():
    # A clear spectral gap: σ_max settles within a few steps, so rtol ends the loop long before 30 steps.
    w = with_spectrum(300, 200, torch.cat([torch.tensor([10.0]), torch.linspace(1, 0.1, 199)]), seed=3)
    exact = float(np_svals(w.numpy())[0])
    full_log, early_log, vetoed_log = {"a": 0, "at": 0}, {"a": 0, "at": 0}, {"a": 0, "at": 0}
    full = sigma_max_batched(*_operators([w], full_log), [(300, 200)], steps=30)[0]
    votes: list[bool] = []
    early = sigma_max_batched(*_operators([w], early_log), [(300, 200)], steps=30, rtol=1e-8,
                              agree=lambda settled: votes.append(settled) or settled)[0]
    assert full_log == {"a": 30, "at": 30}
    assert early_log["a"] == early_log["at"] < 30 and votes[-1] is True and not any(votes[:-1])
    assert early == pytest.approx(exact, rel=1e-7) and full == pytest.approx(exact, rel=1e-7)
    # Another rank that has not settled vetoes the stop: the loop runs the full `steps` on every rank.
    vetoed = sigma_max_batched(*_operators([w], vetoed_log), [(300, 200)], steps=30, rtol=1e-8,
                               agree=lambda settled: False)[0]
    assert vetoed_log == {"a": 30, "at": 30} and vetoed == full
    with pytest.raises(ValueError, match="rtol"):
        sigma_max_batched(*_operators([w], {"a": 0, "at": 0}), [(300, 200)], steps=5, rtol=1.5)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_gram_lanczos_matches_golub_kahan_with_one_product_per_step(method):
    gen = torch.Generator().manual_seed(8)
    mats = [torch.randn(96, 160, generator=gen, dtype=torch.float64),
            torch.randn(3, 5, generator=gen, dtype=torch.float64),  # rank 3 < n: breaks down after 3 steps
            with_spectrum(120, 80, torch.linspace(1, 0.01, 80) ** 2, seed=10),
            torch.zeros(4, 9, dtype=torch.float64)]
    nan = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    nan[2, 3] = float("nan")
    mats.append(nan)
    calls = {"g": 0}

    def apply_g(vs):
        calls["g"] += 1
        return [m.T @ (m @ v) for m, v in zip(mats, vs)]

    gram = sigma_max_gram(apply_g, [m.shape[1] for m in mats], method=method, steps=20)
    gkl = sigma_max_batched(*_operators(mats, {"a": 0, "at": 0}), [tuple(m.shape) for m in mats], method=method,
                            steps=20)
    assert calls["g"] == 20
    assert math.isnan(gram[4]) and gram[3] == 0.0
    for g, k, m in zip(gram[:3], gkl[:3], mats[:3]):
        if method == "lanczos":
            assert g == pytest.approx(float(np_svals(m.numpy())[0]), rel=1e-4)
        else:  # sqrt(‖AᵀA v‖) with the same start vector: the same iterates as the two-product form
            assert g == pytest.approx(k, rel=1e-12)


def test_gram_lanczos_stops_each_settled_layer_while_slower_ones_continue():
    # Layer 0 has a wide spectral gap (settles in a few steps), layer 1 a flat top (needs many more).
    fast = with_spectrum(200, 150, torch.cat([torch.tensor([10.0]), torch.linspace(1, 0.1, 149)]), seed=4)
    slow = torch.randn(200, 150, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mats, live_inputs = [fast, slow], [0, 0]

    def apply_g(vs):
        for i, v in enumerate(vs):
            live_inputs[i] += int(bool(v.any()))  # a stopped layer's slot is zeros
        return [m.T @ (m @ v) for m, v in zip(mats, vs)]

    sigmas = sigma_max_gram(apply_g, [150, 150], steps=40, rtol=1e-8)
    assert live_inputs[0] < live_inputs[1], live_inputs
    for sigma, m in zip(sigmas, mats):
        assert sigma == pytest.approx(float(np_svals(m.numpy())[0]), rel=1e-6)
