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
    ref = tensor_worker(0, 1, "local", fmt)  # one process, here (LocalBackend needs no process group)
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


def test_the_users_own_hf_script_with_bf16_groups_scheduler_and_accumulation() -> None:
    """transformers' Llama with its MLP in TT-matrix form through `deepspeed_api.initialize` (bf16, ZeRO-2, 2 AdamW
    groups, LambdaLR, accumulation 2): every micro-batch's forward computes the prior's term and the proxy's
    backward takes it into the loss; the prune at step 4 happens on both ranks alike; the model's output equals a
    plain-torch Llama whose MLP weights are the reconstructed matrices."""
    from torch import nn

    from examples.hf_common import llama
    from tests.distributed.tensor_workers import HF_ACCUMULATION, HF_PRUNE, HF_STEPS, hf_tensor_worker

    r0, r1 = run_ranks(hf_tensor_worker, world=2, timeout=280)
    assert r0["slots"] == r1["slots"] and len(r0["slots"]) == HF_STEPS
    before, after = r0["slots"][HF_PRUNE - 2], r0["slots"][HF_PRUNE - 1]
    assert all(sum(after[n]) == sum(before[n]) - len(before[n]) for n in before)  # each bond lost one slot
    assert r0["dtypes"] == ["torch.bfloat16"] and r0["weight"] == pytest.approx(1e-4)
    # after step 0 the prior is on: each forward computes its term, each backward takes it (none left over)
    for armed, taken in r0["taken"][HF_ACCUMULATION:]:
        assert all(armed) and all(taken)
    plain = llama()
    state = {k: v for k, v in r0["state"].items() if ".core_" not in k}
    for name, matrix in r0["matrices"].items():
        state[f"{name}.weight"] = matrix
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    assert all(isinstance(plain.get_submodule(n), nn.Linear) for n in r0["matrices"])
    with torch.no_grad():
        expected = plain.to(torch.bfloat16)(input_ids=r0["probe"]).logits.float()
    assert (expected - r0["logits"]).abs().max() < 0.05 * expected.abs().max()
    assert sum(r0["losses"][-4:]) < sum(r0["losses"][:4])
