"""InRank growth on 2 gloo ranks vs the same run in one process."""
from __future__ import annotations

import pytest

from tests.dist_harness import run_ranks
from tests.distributed.inrank_workers import ddp_inrank_worker, reference_inrank

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]


def test_ddp_inrank_growth_matches_reference():
    r0, r1 = run_ranks(ddp_inrank_worker, timeout=180)
    reference = reference_inrank()
    assert reference["decisions"], "the reference run must grow at least once"
    assert r0["decisions"] == r1["decisions"] == reference["decisions"]
    assert any(caps for *_, caps in reference["decisions"]), "at least one growth must reshard"
    for r in (r0, r1):
        assert max(r["unchanged"]) < 1e-6  # growth leaves the model's output unchanged
        assert sum(r["losses"][-5:]) < sum(r["losses"][:5])
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert mean[:10] == pytest.approx(reference["losses"][:10], abs=1e-5)
    assert mean[-10:] == pytest.approx(reference["losses"][-10:], abs=0.05)


def test_fsdp2_inrank_growth_matches_reference():
    from tests.distributed.inrank_workers import fsdp2_inrank_worker

    r0, r1 = run_ranks(fsdp2_inrank_worker, timeout=180)
    reference = reference_inrank()
    assert r0["decisions"] == r1["decisions"] == reference["decisions"]
    assert any(caps for *_, caps in reference["decisions"])
    for r in (r0, r1):
        assert max(r["unchanged"]) < 1e-6
        assert all(b > 0 for b in r["gram_bytes"])  # sharded factors: the Grams are all-reduced
        assert sum(r["losses"][-5:]) < sum(r["losses"][:5])
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert mean[:10] == pytest.approx(reference["losses"][:10], abs=1e-5)
    assert mean[-10:] == pytest.approx(reference["losses"][-10:], abs=0.05)
