"""The loss the CLI logs is the task's loss, not the loss plus the method's prior: a run with the tensorized
prior on logs the same first-step loss as the same run with it off (the weights are equal before step 1), and
the prior still acts (step 2 differs: step 1's update had the prior's gradient)."""
from __future__ import annotations

import pytest

from tests.distributed.ckpt_common import ROOT, cli, losses

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]
CONFIG = ROOT / "configs" / "tensor_mlp_fmnist.yaml"
JOB = ["run.steps=2", "run.backend=local", "run.world_size=1", "run.batch_size=8", "run.limit_train=64",
       "run.eval_samples=16", "run.eval_every=0", "lowrank.tensor.no_kl_steps=0", "lowrank.tensor.warmup=0",
       "lowrank.tensor.init_rank=4", "lowrank.tensor.min_rank=3"]


def test_logged_loss_leaves_out_the_prior_term(tmp_path):
    with_prior, without = tmp_path / "prior", tmp_path / "none"
    cli(with_prior, JOB + ["lowrank.tensor.kl_mult=1.0"], config=CONFIG)
    cli(without, JOB + ["lowrank.tensor.kl_mult=0.0"], config=CONFIG)
    a, b = losses(with_prior), losses(without)
    assert sorted(a) == sorted(b) == [1, 2]
    assert a[1] == pytest.approx(b[1], rel=1e-6, abs=1e-7)
    assert a[2] != pytest.approx(b[2], rel=1e-6, abs=1e-7)
