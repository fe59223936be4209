"""linalg against numpy/scipy oracles: stable rank, Krylov σ_max, explained ratio, truncated SVD."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from dist_lowrank.linalg import (as_matrix, explained_ratio, explained_variance_rank, sigma_max_batched, stable_rank,
                                 truncated_svd_factors)

pytestmark = pytest.mark.unit


def np_srank(w: np.ndarray) -> float:
    s = scipy.linalg.svdvals(w.reshape(w.shape[0], -1).astype(np.float64))
    return float((s ** 2).sum() / s[0] ** 2)


def random_weights():
    gen = torch.Generator().manual_seed(0)
    yield torch.randn(256, 768, generator=gen)
    yield torch.randn(768, 256, generator=gen)
    yield torch.randn(512, 512, generator=gen)
    yield torch.randn(64, 32, 3, 3, generator=gen)
    a, b = torch.randn(300, 8, generator=gen), torch.randn(8, 200, generator=gen)
    yield a @ b + 0.05 * torch.randn(300, 200, generator=gen)
    q1, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(150, 150, generator=gen))
    yield q1[:, :150] @ torch.diag(torch.linspace(1, 0.01, 150) ** 2) @ q2


@pytest.mark.parametrize("index", range(6))
def test_exact_and_lanczos_match_numpy(index):
    w = list(random_weights())[index]
    oracle = np_srank(w.numpy())
    assert stable_rank(w, "exact").value == pytest.approx(oracle, rel=1e-10)
    assert abs(stable_rank(w, "lanczos", 20).value - oracle) / oracle < 0.01


def test_power_iteration_converges_on_gapped_spectrum():
    gen = torch.Generator().manual_seed(1)
    q1, _ = torch.linalg.qr(torch.randn(100, 100, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(80, 80, generator=gen, dtype=torch.float64))
    s = torch.cat([torch.tensor([10.0, 3.0], dtype=torch.float64), torch.linspace(1, 0.1, 78, dtype=torch.float64)])
    w = q1[:, :80] @ torch.diag(s) @ q2
    assert stable_rank(w, "power", 30).value == pytest.approx(np_srank(w.numpy()), rel=1e-3)


def test_degenerate_inputs_have_named_results():
    zero = stable_rank(torch.zeros(5, 7))
    assert (zero.value, zero.status) == (0.0, "zero")
    for method in ("exact", "lanczos", "power"):
        w = torch.randn(6, 4)
        w[2, 3] = float("nan")
        res = stable_rank(w, method)
        assert res.status == "nonfinite" and math.isnan(res.value)
        w[2, 3] = float("inf")
        assert stable_rank(w, method).status == "nonfinite"
    for shape in ((1, 9), (9, 1)):
        assert stable_rank(torch.randn(*shape), "lanczos").value == pytest.approx(1.0, rel=1e-9)
    rank1 = torch.randn(40, 1) @ torch.randn(1, 30)
    assert stable_rank(rank1, "lanczos").value == pytest.approx(1.0, rel=1e-9)
    ill = torch.diag(torch.tensor([1.0, 1e-12, 1e-12], dtype=torch.float64))
    assert stable_rank(ill, "lanczos").value == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_computed_in_fp64(dtype):
    w = torch.randn(64, 48).to(dtype)
    assert stable_rank(w, "exact").value == pytest.approx(np_srank(w.float().numpy()), rel=1e-9)
    assert as_matrix(w).dtype == torch.float64


def test_batched_lockstep_equals_separate_and_counts_calls():
    mats = [m.double() for m in list(random_weights())[:4]]
    mats = [as_matrix(m) for m in mats]
    calls = {"a": 0, "at": 0}

    def apply_a(vs):
        calls["a"] += 1
        return [m @ v for m, v in zip(mats, vs)]

    def apply_at(us):
        calls["at"] += 1
        return [m.T @ u for m, u in zip(mats, us)]

    together = sigma_max_batched(apply_a, apply_at, [tuple(m.shape) for m in mats], steps=20)
    assert calls == {"a": 20, "at": 20}
    for m, value in zip(mats, together):
        alone = sigma_max_batched(lambda vs, m=m: [m @ vs[0]], lambda us, m=m: [m.T @ us[0]], [tuple(m.shape)])
        assert value == alone[0]
    again = sigma_max_batched(apply_a, apply_at, [tuple(m.shape) for m in mats], steps=20)
    assert again == together  # deterministic, bit for bit


def test_explained_ratio_matches_numpy():
    s = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1])
    sn = s.numpy().astype(np.float64)
    for k in range(6):
        kept = sn.copy()
        kept[k:] = 0
        assert explained_ratio(s, k) == pytest.approx(1 - np.var(sn - kept) / np.var(sn))
    assert explained_variance_rank(s, 0.9, 1, 5) == next(k for k in range(1, 5) if explained_ratio(s, k) > 0.9)
    assert explained_variance_rank(s, 0.9999999, 0, 2) == 2  # none qualifies: stop
    assert explained_ratio(torch.ones(4), 1) == 1.0  # zero variance is defined


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_truncated_svd_error_is_the_tail(dtype):
    w = torch.randn(60, 40, dtype=dtype)
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    for r in (1, 7, 25):
        a, b = truncated_svd_factors(w, r)
        assert a.shape == (60, r) and b.shape == (r, 40) and a.dtype == dtype
        err = float(torch.linalg.norm((w - a @ b).double()))
        tol = 1e-8 if dtype == torch.float64 else 1e-4
        assert err == pytest.approx(float(np.sqrt((s[r:] ** 2).sum())), rel=tol)
    a, b = truncated_svd_factors(w, 40)
    assert torch.allclose(a @ b, w, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        truncated_svd_factors(w, 0)
