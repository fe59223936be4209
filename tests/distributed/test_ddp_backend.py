"""DDP switch on 2 gloo ranks vs a single-process reference computed in the same test."""
from __future__ import annotations

import pytest
import torch

from tests.distributed.ddp_workers import ddp_switch_worker
from tests.distributed.fsdp_workers import assert_conv_switch, conv_switch_worker
from tests.distributed.switch_common import (assert_matches_plain_torch, plain_torch_switch, PLAN_RANKS,
                                             UNTOUCHED, factorized_reference_output, reference_run)
from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]


def test_ddp_switch_matches_reference_and_keeps_state():
    ranks = run_ranks(ddp_switch_worker, timeout=180)
    reference = reference_run()
    plain = plain_torch_switch()  # shares no code with the plugin
    r0, r1 = ranks
    assert [(name, replicated) for name, _, replicated in r0["views"]] == [(n, True) for n in sorted(PLAN_RANKS)]
    for name, tensor in r0["full_before"].items():  # DDP on half batches == one process on the whole batch
        assert torch.allclose(tensor, reference["full_before"][name], atol=1e-6)
    expected_out = factorized_reference_output(r0["full_before"])
    for r in ranks:
        assert_matches_plain_torch(r, plain)
        assert torch.allclose(r["out"], expected_out, atol=1e-5)
        for name in UNTOUCHED:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(r["state_before"][name][key], r["state_after"][name][key])
        assert r["new_factor_state"] and not any(r["new_factor_state"])  # factors start with zero moments
        assert r["released"] and r["factors_changed"]
        assert r["losses"][-1] < r["losses"][0]
    for name, tensor in r0["final"].items():
        assert torch.equal(tensor, r1["final"][name])  # replicas stay identical
        assert torch.allclose(tensor, reference["final"][name], atol=1e-5)
    assert torch.allclose(torch.tensor([sum(x) / 2 for x in zip(r0["losses"], r1["losses"])]),
                          torch.tensor(reference["losses"]), atol=1e-5)


def test_ddp_conv_switch_sgd_momentum():
    """Conv2d under DDP with SGD momentum: momentum buffers of untouched params kept bit for bit, the
    factors get the all-reduced gradient, old wrapper (reducer hooks) / optimizer / weights released."""
    ranks = run_ranks(conv_switch_worker, args=("ddp",), timeout=180)
    assert_conv_switch(ranks, "ddp")
    for r in ranks:
        assert r["factor_types"] == ["Parameter"]
        assert set(r["state_before"]["head.weight"]) == {"momentum_buffer"}
    for name, tensor in ranks[0]["final"].items():
        assert torch.equal(tensor, ranks[1]["final"][name]), name  # replicas stay identical
