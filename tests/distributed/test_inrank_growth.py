"""InRank growth on 2 gloo ranks vs the same run in one process."""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.distributed.inrank_workers import INRANK, ddp_inrank_worker, reference_inrank

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]


def assert_losses_follow(r0: dict, r1: dict, reference: dict) -> None:
    """Through the first growth (step 10) and after it the losses equal the reference's; later, bit-level
    differences in reduction order grow where Adam meets ~0 gradients, so only 10-step means are compared."""
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert mean[:15] == pytest.approx(reference["losses"][:15], abs=1e-5)
    windows = [sum(mean[i:i + 10]) / 10 for i in range(0, len(mean), 10)]
    expected = [sum(reference["losses"][i:i + 10]) / 10 for i in range(0, len(mean), 10)]
    assert windows == pytest.approx(expected, abs=0.1)


def test_ddp_inrank_growth_matches_reference():
    r0, r1 = run_ranks(ddp_inrank_worker, timeout=180)
    reference = reference_inrank()
    assert reference["decisions"], "the reference run must grow at least once"
    assert r0["decisions"] == r1["decisions"] == reference["decisions"]
    assert any(caps for *_, caps in reference["decisions"]), "at least one growth must reshard"
    for r in (r0, r1):
        assert max(r["unchanged"]) < 1e-6  # growth leaves the model's output unchanged
        assert r["untouched_bitwise"] and all(r["untouched_bitwise"])  # other parameters' state bit for bit
        assert sum(r["losses"][-5:]) < sum(r["losses"][:5])
    assert_losses_follow(r0, r1, reference)
    assert_growth_is_plain_torchs(r0["growth"])


def explained(s: torch.Tensor, k: int) -> float:
    """The InRank paper's g(k) = 1 − var(s − s[:k]) / var(s), population variances (written here, not imported)."""
    residual = s.clone()
    residual[:k] = 0
    return 1.0 - float(residual.var(unbiased=False)) / float(s.var(unbiased=False))


def assert_growth_is_plain_torchs(growth: dict) -> None:
    """The first resharding growth against plain torch: each layer's new rank from the w singular values
    (torch.linalg.svdvals) of its trained width-w U Vᵀ and g(k) > τ (first k in [r, r + buffer), else r + buffer; capped where r(m+n) < mn stops); the
    grown U, V = the old block, zero U columns, V columns from the documented seeded draw (randn(n, c')/√n with
    seed + c'); Adam moments = the old block and zeros."""
    cfg = INRANK["inrank"]
    assert growth is not None, "the run must grow with a reshard"
    for name, old in growth["before"].items():
        m, n = old["dims"]
        w, r = old["width"], old["rank"]
        s = torch.linalg.svdvals((old["u"][:, :w] @ old["v"][:, :w].T).double())[:w]  # the w a width-w product has
        k = next((k for k in range(r, r + cfg["buffer"]) if explained(s, k) > cfg["tau"]), r + cfg["buffer"])
        k = min(max(k, r), (m * n - 1) // (m + n))
        assert growth["ranks"].get(name, r) == k, (name, growth["ranks"], k)
        if name not in growth["capacities"]:
            continue
        new, c, c2 = growth["after"][name], old["u"].shape[1], growth["capacities"][name]
        assert new["u"].shape == (m, c2) and torch.equal(new["u"][:, :c], old["u"]) and new["u"][:, c:].abs().max() == 0
        draw = torch.randn(n, c2, generator=torch.Generator().manual_seed(old["seed"] + c2)) / n ** 0.5
        assert torch.equal(new["v"][:, :c], old["v"]) and torch.allclose(new["v"][:, c:], draw[:, c:], atol=1e-7)
        for leaf in ("u", "v"):
            for key, value in old["moments"][leaf].items():
                grown = new["moments"][leaf][key]
                assert torch.equal(grown[:, :c], value) and grown[:, c:].abs().max() == 0, (name, leaf, key)


# ZeRO-1 grows through the same DeepSpeedBackend code as ZeRO-2 (only ZeRO-3 branches); its switch is tested in
# test_deepspeed_backend.py and test_user_api.py.
@pytest.mark.parametrize("backend", ["fsdp2", "zero2", "zero3"])
def test_sharded_inrank_growth_matches_reference(backend):
    from tests.distributed.inrank_workers import deepspeed_inrank_worker, fsdp2_inrank_worker

    if backend == "fsdp2":
        r0, r1 = run_ranks(fsdp2_inrank_worker, timeout=180)
    else:
        r0, r1 = run_ranks(deepspeed_inrank_worker, args=(int(backend[-1]),), timeout=180)
    reference = reference_inrank()
    assert r0["decisions"] == r1["decisions"] == reference["decisions"]
    assert any(caps for *_, caps in reference["decisions"])
    for r in (r0, r1):
        assert max(r["unchanged"]) < 1e-6
        assert r["untouched_bitwise"] and all(r["untouched_bitwise"])
        sharded = backend in ("fsdp2", "zero3")  # replicated factors (ZeRO-1/2) need no communication
        assert all((b > 0) == sharded for b in r["gram_bytes"])
        assert sum(r["losses"][-5:]) < sum(r["losses"][:5])
    assert_losses_follow(r0, r1, reference)


@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "zero3"])
def test_efficient_inrank_fold_matches_reference(backend):
    """Ranks fixed at step 20, W0 + U Vᵀ folded into U·V by truncated SVD; training goes on."""
    from tests.distributed.inrank_workers import deepspeed_inrank_worker, fsdp2_inrank_worker

    worker, args = {"ddp": (ddp_inrank_worker, (True,)), "fsdp2": (fsdp2_inrank_worker, (True,)),
                    "zero3": (deepspeed_inrank_worker, (3, True))}[backend]
    r0, r1 = run_ranks(worker, args=args, timeout=180)
    reference = reference_inrank(fold=True)
    assert r0["decisions"] == r1["decisions"] == reference["decisions"]
    assert reference["decisions"][-1][:2] == (20, "fix")
    fixed = reference["decisions"][-1][2]
    assert r0["layers"] == r1["layers"] == reference["layers"] == {n: ("LowRankLinear", r) for n, r in fixed.items()}
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert mean[:15] == pytest.approx(reference["losses"][:15], abs=1e-5)
    assert sum(mean[-5:]) < sum(mean[:5])
