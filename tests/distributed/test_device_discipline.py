"""Device discipline on every backend, checked on the CPU (tests/device_discipline.py: virtual cuda:LOCAL_RANK).

One run per backend family (LocalBackend in this process; DDP, FSDP2, DeepSpeed ZeRO-1/2/3 on 2 gloo ranks)
takes the monitor, a training step, a profiled switch, an InRank spectrum and a growth past capacity under
the check: no op may meet tensors of two devices, no collective may get a host tensor. The results are also
checked against plain torch: the switched layers equal the truncated SVD (torch.linalg.svd) of the weight
they replaced, the growth leaves the InRank spectrum unchanged.
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.distributed.device_workers import RANKS

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]


def truncated(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-r approximation, from torch.linalg.svd (plain torch, not the plugin's code)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def check_result(r: dict) -> None:
    assert r["switch_violations"] == [], "\n".join(r["switch_violations"])
    assert r["grow_violations"] == [], "\n".join(r["grow_violations"])
    assert r["switch_ops"] > 500 and r["grow_ops"] > 300  # the check saw the work, not an empty region
    for name, rank in RANKS.items():
        expected = truncated(r["dense"][name], rank)
        assert torch.allclose(r["effective"][name], expected, atol=1e-5, rtol=1e-4), name
    assert set(r["timing"]) == set(RANKS)  # the profiled switch timed every layer (at the recorded shapes)
    for name, before in r["svals"].items():
        after = r["svals_after"][name]
        assert len(after) == len(before) + 1
        assert after[:len(before)] == pytest.approx(before, rel=1e-6, abs=1e-9)
        assert abs(after[-1]) < 1e-6  # the new U column is zero: the function did not change
    assert all(c % 2 == 0 for c in r["capacities"].values())
    assert all(torch.isfinite(torch.tensor(r["losses"] + r["inrank_losses"])))


def test_local_backend_device_clean():
    from tests.distributed.device_workers import local_family

    check_result(local_family(0, 1))


@pytest.mark.parametrize("family", ["ddp", "fsdp2", "deepspeed"])
def test_backend_family_device_clean(family):
    import tests.distributed.device_workers as workers

    results = run_ranks(getattr(workers, f"{family}_family"), timeout=240)
    per_rank = [list(r.values()) if family == "deepspeed" else [r] for r in results]
    for runs in per_rank:
        assert len(runs) == (3 if family == "deepspeed" else 1)
        for r in runs:
            check_result(r)
    first, second = per_rank
    for a, b in zip(first, second):  # both ranks hold the same switched layers
        for name in RANKS:
            assert torch.equal(a["effective"][name], b["effective"][name])
