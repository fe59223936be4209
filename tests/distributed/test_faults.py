"""Faults during the switch and during a save, on 2 gloo ranks (RELIABILITY scenarios 3, 5, 10).

Faults are armed through DIST_LOWRANK_FAULT (dist_lowrank/faults.py). The restart tests run under the real
`torchrun --max-restarts 1`: the first attempt fails, torchrun restarts every rank, the job resumes from
its last committed checkpoint and must end exactly like an uninterrupted run of the same job under the
same launcher, computed in the same test.
"""
from __future__ import annotations

import pytest

from tests.dist_harness import free_port, run_ranks
from tests.distributed.ckpt_common import BACKENDS, BIN, EXPORT, checkpoint, cli, losses, summary
from tests.distributed.ckpt_workers import nonfinite_at_switch_worker, train_worker

pytestmark = [pytest.mark.dist, pytest.mark.timeout(900)]


def test_exception_in_one_ranks_factorization_ends_every_rank_with_the_cause(tmp_path):
    """Scenario 3, first half: rank 1's SVD raises; every rank ends with an error naming rank 1's cause."""
    results = run_ranks(train_worker, world=2, timeout=240, expect_errors=True,
                        args=([f"run.out_dir={tmp_path}"],), env={"DIST_LOWRANK_FAULT": "factorize:raise:1"})
    assert all(isinstance(r, tuple) and r[0] == "error" for r in results), results
    for status, message in results:
        assert "injected fault at factorize on rank 1" in message
    assert "RemoteRankError" in results[0][1]
    assert not (checkpoint(tmp_path, 8) / "COMMIT").exists(), "nothing is committed after a failed switch"


def test_straggler_is_named_not_waited_for(tmp_path):
    """Scenario 5: rank 1 sleeps 10 s before the switch, the barrier allows 3 s: rank 0 names rank 1."""
    results = run_ranks(train_worker, world=2, timeout=240, expect_errors=True,
                        args=([f"run.out_dir={tmp_path}", "lowrank.switch.barrier_timeout_s=3"],),
                        env={"DIST_LOWRANK_FAULT": "switch@8:sleep:1:10"})
    assert results[0][0] == "error" and "StragglerError" in results[0][1], results[0]
    assert "switch at step 8: rank(s) [1] did not arrive within 3s" in results[0][1], results[0][1]
    assert results[1][0] == "error", "the late rank fails too once its peer is gone (no hang)"


def test_a_short_delay_inside_the_timeout_still_switches(tmp_path, uninterrupted):
    """Scenario 5, other half: a 2 s straggler inside a 60 s barrier: the same switch and the same losses
    as the undisturbed run."""
    reference = uninterrupted("zero2")
    delayed = run_ranks(train_worker, world=2, timeout=240, env={"DIST_LOWRANK_FAULT": "switch@8:sleep:1:2"},
                        args=([f"run.out_dir={tmp_path / 'late'}", "lowrank.switch.barrier_timeout_s=60"],))
    for late in delayed:
        assert late["switch_step"] == summary(reference)["switch_step"] == 8
        assert late["ranks"] == summary(reference)["ranks"]
    assert losses(tmp_path / "late") == losses(reference)


@pytest.mark.parametrize("fault,backend", [("factorize:raise:1", "zero2"), ("factorize:kill:1", "ddp"),
                                           ("save@8:kill:1", "fsdp2")])
def test_torchrun_restart_resumes_from_the_last_good_checkpoint(fault, backend, tmp_path, uninterrupted):
    """Scenarios 3 and 10: an exception or a SIGKILL on rank 1 during the switch (step 8), or a SIGKILL
    while step 8's checkpoint is being written. torchrun restarts the job; the step-8 checkpoint is not
    committed, so it resumes from step 4, switches at step 8 to the same ranks, and every loss equals the
    uninterrupted run's bit for bit (the same 2 gloo ranks, started by `dist-lowrank train`)."""
    torchrun = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", "2", "--max-restarts", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}"]
    ref, out = uninterrupted(backend), tmp_path / "faulty"
    proc = cli(out, BACKENDS[backend] + EXPORT, launcher=torchrun,
               env={"DIST_LOWRANK_FAULT": fault, "DIST_LOWRANK_FAULT_ONCE": str(tmp_path / "fired")})
    assert (tmp_path / "fired").exists(), "the fault fired in the first attempt"
    log = proc.stdout + proc.stderr
    if fault.startswith("save"):
        assert "incomplete checkpoint" in log, "the killed save was skipped with a warning"
    assert summary(out)["switch_step"] == summary(ref)["switch_step"] == 8
    assert summary(out)["ranks"] == summary(ref)["ranks"]
    assert losses(out) == losses(ref)
    assert (checkpoint(out, 12) / "COMMIT").exists()


def test_nonfinite_loss_on_one_rank_at_the_switch_step_defers_every_rank():
    """Scenario 4: the switch is due at step 6; rank 1 alone sees a NaN loss there. Every rank skips the
    step together (no estimate at 6) and switches at the next cadence step, exactly as a single process
    that saw the NaN itself."""
    reference = run_ranks(nonfinite_at_switch_worker, world=1, timeout=120, args=(0,))[0]
    results = run_ranks(nonfinite_at_switch_worker, world=2, timeout=120, args=(1,))
    assert reference["switch"] == 8 and 6 not in reference["estimates"]
    for result in results:
        assert result == reference
