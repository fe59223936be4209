"""FSDP2 switch on 2 gloo ranks vs a single-process reference computed in the same test."""
from __future__ import annotations

import pytest
import torch

from tests.distributed.fsdp_workers import (CONV_PRE_STEPS, assert_conv_switch, conv_reference, conv_switch_worker,
                                           fsdp2_switch_worker, fsdp2_uneven_views_worker, uneven_model)
from tests.distributed.switch_common import (assert_matches_plain_torch, plain_torch_switch, UNTOUCHED,
                                             assert_estimates, factorized_reference_output, reference_run)
from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]


def test_fsdp2_switch_matches_reference_and_keeps_state():
    ranks = run_ranks(fsdp2_switch_worker, timeout=180)
    reference = reference_run()
    plain = plain_torch_switch()  # shares no code with the plugin
    r0, r1 = ranks
    for (name, dims, _, _), (_, _, _, _) in zip(r0["views"], r1["views"]):  # row shards tile the weight
        pieces = sorted([(r["views"][i][2], r["views"][i][3]) for r in ranks for i, v in enumerate(r["views"])
                         if v[0] == name], key=lambda t: t[0])
        flat = torch.cat([p for _, p in pieces])
        assert torch.equal(flat, r0["full_before"][f"{name}.weight"].reshape(-1))
    for name, tensor in r0["full_before"].items():  # sharded training == one process on the global batch
        assert torch.allclose(tensor, reference["full_before"][name], atol=1e-6)
    assert_estimates(ranks, r0["full_before"], sharded=True)
    expected_out = factorized_reference_output(r0["full_before"])
    for r in ranks:
        assert_matches_plain_torch(r, plain)
        assert r["all_dtensor"], "new parameters must be sharded like the rest"
        assert torch.allclose(r["out"], expected_out, atol=1e-5)
        for name in UNTOUCHED:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(r["state_before"][name][key], r["state_after"][name][key])
        assert r["new_factor_state"] and not any(r["new_factor_state"])
        assert r["released"] and r["factors_changed"]  # factors really train (FSDP2 trap avoided)
        assert r["losses"][-1] < r["losses"][0]
    for name, tensor in r0["final"].items():
        assert torch.allclose(tensor, reference["final"][name], atol=1e-5), name


def test_fsdp2_uneven_rows_views_tile_the_matrix():
    ranks = run_ranks(fsdp2_uneven_views_worker, timeout=120)
    for index, layer in enumerate(uneven_model()):
        weight = layer.weight.detach()
        (dims0, off0, flat0), (dims1, off1, flat1) = ranks[0][index], ranks[1][index]
        assert dims0 == dims1 == tuple(weight.shape)
        rows0 = (weight.shape[0] + 1) // 2  # torch.chunk: the first rank takes the larger half
        assert (off0, flat0.numel()) == (0, rows0 * weight.shape[1])
        assert off1 == flat0.numel()
        assert torch.equal(torch.cat([flat0, flat1]), weight.reshape(-1))


def test_fsdp2_conv_switch_amsgrad_and_trap_avoided():
    """Conv2d with 7 output channels (uneven shards), Adam with amsgrad; the factors are sharded DTensors
    that receive the synchronized global-batch gradient, unlike the naive swap into a sharded model."""
    ranks = run_ranks(conv_switch_worker, args=("fsdp2",), timeout=180)
    assert_conv_switch(ranks, "fsdp2")
    reference = conv_reference("fsdp2")
    for r in ranks:
        assert r["factor_types"] == ["DTensor"]
        assert set(r["state_before"]["head.weight"]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        for name, step in r["steps"].items():  # factors count their own steps from 0 (bias correction)
            assert step == (1 if name.startswith("features.2.") else CONV_PRE_STEPS + 1), (name, step)
    naive0, naive1 = ranks[0]["naive_grads"], ranks[1]["naive_grads"]
    assert naive0.keys() == reference["grads"].keys()
    for name, (kind, grad) in naive0.items():  # the trap: unmanaged plain tensors, gradients never reduced
        assert kind == "Parameter" and naive1[name][0] == "Parameter"
        assert not torch.allclose(grad, naive1[name][1], atol=1e-4), name
        assert not torch.allclose(grad, reference["grads"][name], atol=1e-4), name
