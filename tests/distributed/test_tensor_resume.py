"""Tensorized-layer checkpoint/resume across a prune (issue 17), through the real `dist-lowrank train` on 2 gloo
ranks with ZeRO-3: the 784-512-10 MLP in TT-matrix form, the prior on from step 1, a prune at step 4 (every bond
loses its smallest-λ slot). Resumed from step 3 the run must make the same prune from the restored λ; resumed from
step 6 it must rebuild the pruned shapes from the checkpoint's layout. Both continue the uninterrupted run exactly:
losses bit for bit, the same prune, the same final weights (consolidated fp32 export)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.ckpt_common import EXPORT, ROOT, checkpoint, cli, exported, losses

pytestmark = [pytest.mark.dist, pytest.mark.timeout(600)]
CONFIG = ROOT / "configs" / "tensor_mlp_fmnist.yaml"
JOB = ["run.steps=8", "run.checkpoint_every=3", "run.batch_size=8", "run.limit_train=512", "run.eval_samples=200",
       "run.eval_every=0", "run.backend=deepspeed", "run.zero_stage=3", "lowrank.tensor.init_rank=4",
       "lowrank.tensor.min_rank=3", "lowrank.tensor.threshold=1e9", "lowrank.tensor.prune_every=4",
       "lowrank.tensor.prune_after=4", "lowrank.tensor.kl_mult=1e-3", "lowrank.tensor.no_kl_steps=0",
       "lowrank.tensor.warmup=0", *EXPORT]


def prunes(out) -> list[tuple]:
    events = map(json.loads, (out / "events.jsonl").read_text().splitlines())
    return [(e["step"], e["ranks"], e.get("slots")) for e in events if e["event"] == "prune"]


def test_resume_before_and_after_a_prune_continues_the_run_bitwise(tmp_path):
    full = tmp_path / "full"
    cli(full, JOB, config=CONFIG)
    (prune,) = prunes(full)
    assert prune[0] == 4 and all(len(s) for s in prune[2].values())
    manifest = json.loads((checkpoint(full, 6) / "manifest.json").read_text())
    assert {n: e["ranks"] for n, e in manifest["layout"].items()} == prune[2]  # the pruned bonds
    reference = losses(full)
    for step in (3, 6):
        resumed = tmp_path / f"from{step}"
        cli(resumed, JOB + [f"run.resume={checkpoint(full, step)}"], config=CONFIG)
        mine = losses(resumed)
        assert sorted(mine) == list(range(step + 1, 9)) and mine == {s: reference[s] for s in mine}
        assert prunes(resumed) == ([prune] if step < 4 else [])
        a, b = exported(full), exported(resumed)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
