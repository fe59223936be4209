"""Activation checkpointing on 2 gloo ranks: the switch and an InRank growth with it equal the same runs without.

FSDP2: torch's `checkpoint_wrapper` applied inside the user's sharding function before `fully_shard` (the
torchtitan pattern; parameter names gain `_checkpoint_wrapped_module.`, the FSDP2 rebuild replays the
switch on model_fn's unwrapped names). DeepSpeed ZeRO-3: HF's gradient checkpointing (torch.utils.checkpoint
inside every block). Model: transformers' Llama from a config (nn.Linear projections, so InRank applies).
One 2-rank run per engine does all four jobs (switch / growth × with / without checkpointing) in turn.
The reference for each checkpointed job is the same job without checkpointing; the post-switch function
itself is checked against plain torch in test_hf_models.py.
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

STEPS = 10
INRANK = {"strategy": "inrank", "inrank": {"init_rank": 2, "warmup": 4, "gap": 3, "tau": 0.9, "buffer": 6,
                                           "capacity_multiple": 4, "growth_factor": 1.5}}


def jobs() -> dict:
    from examples.hf_common import lowrank_section

    return {"switch": lowrank_section(switch_step=5), "grow": INRANK}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from tests.distributed.hf_workers import checkpointing_pairs_deepspeed, checkpointing_pairs_fsdp2

    done: dict = {}

    def get(engine: str):
        if engine not in done:
            if engine == "fsdp2":
                out = str(tmp_path_factory.mktemp("ckpt-fsdp2"))
                done[engine] = run_ranks(checkpointing_pairs_fsdp2, args=(jobs(), STEPS, out), timeout=240)
            else:
                done[engine] = run_ranks(checkpointing_pairs_deepspeed, args=(3, jobs(), STEPS), timeout=240)
        return done[engine]
    return get


@pytest.mark.parametrize("job", ["switch", "grow"])
@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_checkpointed_run_equals_the_run_without(engine, job, pairs):
    for r in pairs(engine):  # each rank
        with_ckpt, without = r[job, True], r[job, False]
        # checkpointing is really on: the block runs its forward again in backward (2 calls per step, else 1)
        assert (with_ckpt["block_calls"], without["block_calls"]) == (2, 1)
        if engine == "fsdp2":
            assert any("._checkpoint_wrapped_module." in n for n in with_ckpt["param_names"])
        unwrapped = {n.replace("._checkpoint_wrapped_module", ""): r for n, r in with_ckpt["ranks"].items()}
        assert with_ckpt["events"] == without["events"] and unwrapped == without["ranks"] and unwrapped
        kinds = [kind for kind, _ in with_ckpt["events"]]
        assert kinds and set(kinds) == {job}
        assert with_ckpt["after_reshard"], "the job must reshard (switch, or growth past capacity)"
        for (k1, s1, out1), (k2, s2, out2) in zip(with_ckpt["after_reshard"], without["after_reshard"]):
            assert (k1, s1) == (k2, s2)
            assert torch.allclose(out1, out2, atol=1e-6, rtol=0)
        assert with_ckpt["losses"] == pytest.approx(without["losses"], abs=1e-6)
        assert sum(with_ckpt["losses"][-3:]) < sum(with_ckpt["losses"][:3])
    r0, r1 = pairs(engine)
    assert r0[job, True]["events"] == r1[job, True]["events"] and r0[job, True]["ranks"] == r1[job, True]["ranks"]


def test_checkpoint_wrapped_model_saves_under_unwrapped_names(pairs):
    """save_lowrank drops `_checkpoint_wrapped_module.`: the switched model loads into model_fn's plain model."""
    r0 = pairs("fsdp2")[0]["switch", True]
    assert torch.allclose(r0["loaded_logits"], r0["live_logits"], atol=1e-6)


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_llama_switch_equals_plain_torch_factorization(engine, pairs):
    """Llama with default targets on ZeRO-3 too (test_hf_models.py has it on FSDP2): the output right after
    the switch equals the run's dense weights factorized by plain torch, with and without checkpointing."""
    from tests.distributed.hf_workers import reference_switch_logits

    r0, r1 = pairs(engine)
    plain = r0["switch", False]
    expected = reference_switch_logits("llama", plain["dense"], plain["ranks"])
    for r in (r0, r1):
        for checkpointing in (False, True):
            assert torch.allclose(r["switch", checkpointing]["switch_logits"], expected, atol=1e-5, rtol=1e-5)
