"""Tensorized layers on real ranks (issue 17): the tests' MLP with its hidden layers in CP (DDP), TT (FSDP2, ZeRO-3),
Tucker (ZeRO-1) and TT-matrix (ZeRO-2), Adam with the prior's term, the EM update every step and one prune, on 2
ranks equals one process on the global batch: the same λ after every step, the same prune, the same losses and
weights. λ is the M-step of the whole cores read back with the engine's own API (sharded engines sum their pieces
in one all-reduce of the small vectors; replicas send nothing); within the run, the prune slices the pruned cores'
values and Adam moments and leaves every other parameter and its state bit for bit."""
from __future__ import annotations

import pytest
import torch

from dist_lowrank.methods.tensor import formats
from tests.dist_harness import run_ranks
from tests.distributed.tensor_workers import PRUNE_STEP, TENSOR_LAYERS, tensor_worker

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]
CASES = {"ddp": "cp", "fsdp2": "tt", "zero1": "tucker", "zero2": "ttm", "zero3": "tt"}
SHARDED = ("fsdp2", "zero3")


def _slice(value: torch.Tensor, index) -> torch.Tensor:
    for dim, kept in enumerate(index):
        if kept is not None:
            value = value.index_select(dim, torch.tensor(kept))
    return value


@pytest.mark.parametrize("kind", sorted(CASES))
def test_two_ranks_equal_one_process_through_a_prune(kind: str) -> None:
    fmt = CASES[kind]
    (ref,) = run_ranks(tensor_worker, world=1, timeout=120, args=("local", fmt))
    results = run_ranks(tensor_worker, world=2, timeout=240, args=(kind, fmt))
    # a decision, not a tie: at the prune step every group's smallest λ is clearly below its next one
    at_prune = ref["measured"][PRUNE_STEP]
    for groups in at_prune.values():
        for lam in groups:
            low, nxt = sorted(lam)[:2]
            assert low < nxt * (1 - 1e-3)
    expected_keep = {n: [sorted(sorted(range(len(lam)), key=lambda k: lam[k])[1:]) for lam in groups]
                     for n, groups in at_prune.items()}
    assert ref["plans"] == [(PRUNE_STEP, expected_keep)]
    # each rank's loss is its half-batch's loss + the prior's term (the same on both): their mean is the global one
    mean = [sum(losses) / 2 for losses in zip(*(out["losses"] for out in results))]
    assert mean == pytest.approx(ref["losses"], rel=1e-5)
    for out in results:
        assert out["plans"] == ref["plans"]
        for mine, theirs in zip(out["scales"], ref["scales"]):
            assert mine.keys() == theirs.keys()
            for name in mine:
                for a, b in zip(mine[name], theirs[name]):
                    assert a == pytest.approx(b, rel=2e-5, abs=1e-12)
        for name, entry in ref["final"].items():
            torch.testing.assert_close(out["final"][name]["value"], entry["value"], rtol=1e-4, atol=1e-6)
        # λ after the last step = the M-step (log-uniform: M / (D + 1)) of the whole final cores
        for layer in TENSOR_LAYERS:
            spec = out["specs"][layer]
            cores = [out["final"][f"{layer}.core_{i}"]["value"].double() for i in range(len(formats.core_shapes(spec)))]
            for lam, m, d in zip(out["scales"][-1][layer], formats.slice_sums(spec, cores), formats.slice_counts(spec)):
                assert lam == pytest.approx((m / (d + 1)).tolist(), rel=1e-5)
        groups = sum(len(formats.rank_groups(out["specs"][n])) for n in TENSOR_LAYERS)
        sizes = sum(sum(out["specs"][n].ranks) for n in TENSOR_LAYERS)
        assert out["scale_bytes"] == (8 * sizes if kind in SHARDED else 0) and groups > 0
        # the prune itself: sliced cores = slices of the values and moments before it; the rest bit for bit
        before, after = out["around"]["before"], out["around"]["after"]
        assert before.keys() == after.keys()
        keep = dict(out["plans"][0][1])
        for name, entry in before.items():
            layer, leaf = name.rsplit(".", 1)
            new, want = after[name], entry
            if layer in keep and leaf.startswith("core_"):
                index = formats.pruned(out["specs_before"][layer], keep[layer])[1][int(leaf[5:])]
                want = {k: v if v.dim() == 0 else _slice(v, index) for k, v in entry.items()}
            assert new.keys() == want.keys()
            for key in want:
                assert torch.equal(new[key], want[key]), (name, key)
