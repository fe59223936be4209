"""Mixed precision across a switch on 2 gloo ranks, against plain torch.

One pair of processes runs every scenario (tests/distributed/precision_workers.py): DeepSpeed bf16 (ZeRO-2, 3),
DeepSpeed fp16 with the dynamic loss scale (ZeRO-2, 3), FSDP2 with MixedPrecisionPolicy(bf16, reduce fp32) in the
user's sharding function, DDP under torch.autocast(bf16). Oracle: the factors are torch.linalg.svd of the fp32
value the switch starts from (DeepSpeed's fp32 master; FSDP2 / DDP's fp32 parameter), split A = U√Σ, B = √ΣVᵀ
(each U column's largest-|.| entry positive), stored in the training dtype; stable ranks are ‖W‖_F²/σ_max² of
that same fp32 value. DeepSpeed fp16 on the CPU accelerator runs here (deepspeed 0.19.8), so the loss scale is
tested on real engines, not on scaler objects alone.
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.distributed.precision_workers import RANKS

pytestmark = [pytest.mark.dist, pytest.mark.timeout(400)]

DTYPES = {"ds_bf16_z2": torch.bfloat16, "ds_bf16_z3": torch.bfloat16, "ds_fp16_z2": torch.float16,
          "ds_fp16_z3": torch.float16, "fsdp2_mp": torch.float32, "ddp_autocast": torch.float32}


@pytest.fixture(scope="module")
def runs():
    from tests.distributed.precision_workers import all_precisions

    return run_ranks(all_precisions, timeout=360)


NO_FP16 = ("DeepSpeed's accelerator reports no fp16 on this host (CPU accelerator: "
           "torch.ops.mkldnn._is_mkldnn_fp16_supported() is False), so DeepSpeed refuses fp16 engines here")


def case_result(runs, case: str) -> list[dict]:
    """Each rank's result for `case`; a DeepSpeed fp16 case is skipped, with the reason, where fp16 is refused."""
    if case not in runs[0]:
        pytest.skip(f"{case}: {NO_FP16}")
    return [result[case] for result in runs]


def oracle_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = U√Σ (m×r), B = √ΣVᵀ (r×n) from torch.linalg.svd in fp64, signs fixed as documented."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    signs = torch.sign(u[u.abs().argmax(dim=0), torch.arange(rank)])
    root = s.sqrt()
    return u * signs * root, (root * signs)[:, None] * vh


def close_in(stored: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Equal to the oracle rounded to `dtype`, up to one unit in the last place (fp64 → fp32 → dtype rounds twice)."""
    scale = float(expected.abs().max())
    return stored.dtype == dtype and torch.allclose(stored.double(), expected.to(dtype).double(),
                                                    rtol=0, atol=torch.finfo(dtype).eps * scale)


@pytest.mark.parametrize("case", sorted(DTYPES))
def test_switch_factors_and_sranks_from_fp32(runs, case):
    for r in case_result(runs, case):
        for name, rank in RANKS.items():
            master = r["masters"][name]
            a, b = oracle_factors(master, rank)
            stored_a, stored_b = r["stored"][name]
            assert close_in(stored_a, a, DTYPES[case]) and close_in(stored_b, b, DTYPES[case]), name
            if "fp32" in r:  # DeepSpeed: the new fp32 masters are the unrounded factors
                fp32_a, fp32_b = r["fp32"][name]
                assert close_in(fp32_a, a, torch.float32) and close_in(fp32_b, b, torch.float32), name
                assert r["view_dtypes"][name] == "torch.float32"  # the monitor read the fp32 master
            sigma = torch.linalg.svdvals(master)
            assert r["sranks"][name] == pytest.approx(float((sigma ** 2).sum() / sigma[0] ** 2), rel=1e-3)  # Lanczos, 40 steps
        assert all(torch.isfinite(torch.tensor(r["losses"])))
    first, second = case_result(runs, case)
    for name in RANKS:  # every rank holds the same switched layers
        assert all(torch.equal(x, y) for x, y in zip(first["stored"][name], second["stored"][name]))


@pytest.mark.parametrize("case", sorted(DTYPES))
def test_layer_timing_at_training_dtype(runs, case):
    r = case_result(runs, case)[0]
    assert r["timed"] == sorted(RANKS)
    expected = ["torch.bfloat16", "torch.bfloat16" if case == "ddp_autocast" else "None"]
    if case.startswith("ds_fp16"):
        expected[0] = "torch.float16"
    assert all(r["formats"][name] == expected for name in RANKS)


@pytest.mark.parametrize("case", ["ds_fp16_z2", "ds_fp16_z3"])
def test_fp16_loss_scale_continues_across_rebuild(runs, case):
    for r in case_result(runs, case):
        before, after = r["scaler_before"], r["scaler_after"]
        assert r["skipped_before"] > 0 and before["cur_scale"] < 2 ** 24  # overflows brought the scale down
        assert after == before  # cur_scale, cur_iter, last_overflow_iter, cur_hysteresis: carried, not restarted
        assert r["skipped_after"] == r["skipped_before"]  # the engine's skipped-step count too
        # A restarted scaler (2^24, hysteresis 2) skipped the first 7 steps of this run; the carried one skips at
        # most one step after the switch (hysteresis 1, the scale sits at the edge) and only ever halves.
        assert r["skipped_end"] - r["skipped_after"] <= 1
        assert r["scale_end"] in (before["cur_scale"], before["cur_scale"] / 2)


def test_fsdp2_mixed_precision_computes_in_bf16(runs):
    for result in runs:
        assert result["fsdp2_mp"]["out_dtype"] == "torch.bfloat16"


def test_readme_example_fp16_switches_and_keeps_training(runs):
    """examples/mixed_precision.py (DeepSpeed fp16, ZeRO-2): one plan on both ranks, the switch inside
    engine.step(), training goes on in fp16 without a burst of skipped steps after it."""
    first, second = case_result(runs, "example_ds_fp16")
    assert first["switch_step"] == second["switch_step"] and first["switch_step"] is not None
    assert first["ranks"] == second["ranks"] and first["ranks"]
    assert first["skipped_steps"] == second["skipped_steps"] <= 2  # 2^16 is below the overflow edge here
    losses = [(a + b) / 2 for a, b in zip(first["losses"], second["losses"])]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-5:]) < sum(losses[:5])
