"""factor_moments=projected and lr_scale at the switch, on real gloo ranks, per backend: every factor's gathered
exp_avg / exp_avg_sq / step against the formulas computed here in plain torch from W's pre-switch moments and
the factors, the bias's state carried, and the factors' lr = lr_scale × their group's after a scheduler step."""
from __future__ import annotations

import math

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.distributed.moment_workers import LR_SCALE, projected_switch_worker
from tests.distributed.switch_common import PLAN_RANKS, PRE_STEPS


@pytest.mark.parametrize("kind", ["ddp", "zero2", "fsdp2", "zero3"])
def test_projected_moments_and_lr_scale(kind):
    ranks = run_ranks(projected_switch_worker, args=(kind,), timeout=180)
    for result in ranks:
        before, after = result["before"], result["after"]
        for layer in PLAN_RANKS:
            a = after[f"{layer}.second.weight"]["value"]  # m×r
            b = after[f"{layer}.first.weight"]["value"]   # r×n
            m, v = before[f"{layer}.weight"]["exp_avg"], before[f"{layer}.weight"]["exp_avg_sq"]
            assert float(m.abs().max()) > 0 and float(v.abs().max()) > 0
            expected = {
                f"{layer}.second.weight": {"exp_avg": m @ b.T, "exp_avg_sq": v @ (b * b).T},
                f"{layer}.first.weight": {"exp_avg": a.T @ m, "exp_avg_sq": (a * a).T @ v},
                f"{layer}.second.bias": {k: before[f"{layer}.bias"][k] for k in ("exp_avg", "exp_avg_sq")},
            }
            for name, moments in expected.items():
                for key, want in moments.items():
                    got = after[name][key]
                    torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-5, atol=1e-8,
                                               msg=lambda s, n=name, k=key: f"{kind} {n} {k}: {s}")
                assert after[name]["step"] == before[f"{layer}.weight"]["step"] == PRE_STEPS, (kind, name)
                assert math.isclose(after[name]["lr"], LR_SCALE * after["net.0.weight"]["lr"], rel_tol=1e-9)
                lr = result["lr_after_step"]
                assert lr["net.0.weight"] < after["net.0.weight"]["lr"]  # the scheduler did decay it
                assert math.isclose(lr[name], LR_SCALE * lr["net.0.weight"], rel_tol=1e-9), (kind, name, lr)
        assert math.isfinite(result["loss"])
