"""PyTorch Lightning: `LowRankCallback` inside `trainer.fit()` with the real DDP strategy on 2 gloo ranks.

One 2-rank job (tests/distributed/lightning_workers.py) runs, in the same processes, the reference fit (no
callback), the callback's fit (Cuttlefish switch at step 8, ModelCheckpoint every 8 steps) and a fresh fit
resumed from the checkpoint at step 16 (after the switch); every check below reads it:

- before the switch the losses equal the same Lightning run without the callback; the loss keeps falling;
- one plan on both ranks, identical weights on both at the end;
- the switched layer holds the plain-torch SVD truncation (torch.linalg.svd) of the dense weight at the switch;
- Lightning's references follow the rebuild: DDP wrapper, optimizer, LightningOptimizer, the scheduler; the
  user's param groups (own keys, weight decay) and the scheduler's position survive;
- the resumed fit rebuilds the switched shapes before the state dict loads and continues the same run;
- InRank growth inside fit equals the library's own DDP loop on the same data;
- an unsupported strategy (FSDP1) or method (DLRT) is refused in one line naming it.

examples/lightning_ddp.py runs under the real torchrun.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.distributed.lightning_workers import fit_runs

    return run_ranks(fit_runs, args=(str(tmp_path_factory.mktemp("lightning")),), timeout=280)


def mean(a: list[float], b: list[float]) -> list[float]:
    return [(x + y) / 2 for x, y in zip(a, b)]


def test_losses_before_the_switch_equal_lightning_without_the_callback(runs):
    from tests.distributed.lightning_workers import STEPS

    r0, r1 = runs
    switch = r0["switch_step"]
    assert switch is not None and 2 <= switch < STEPS
    for r in runs:
        assert len(r["losses"]) == len(r["reference"]) == STEPS
        assert r["losses"][:switch] == pytest.approx(r["reference"][:switch], abs=1e-6)
        assert r["losses"][switch:] != pytest.approx(r["reference"][switch:], abs=1e-4)  # the switch changed the run
    losses = mean(r0["losses"], r1["losses"])
    first, before, after = (sum(losses[i:i + 4]) / 4 for i in (0, switch - 4, STEPS - 4))
    assert after < before < first


def test_one_plan_on_both_ranks(runs):
    r0, r1 = runs
    assert r0["switch_step"] == r1["switch_step"]
    assert r0["ranks"] == r1["ranks"] and r0["ranks"]
    assert r0["layout"] == r1["layout"] == {n: {"type": "lowrank", "rank": k} for n, k in r0["ranks"].items()}
    assert r0["checksum"] == r1["checksum"]  # DDP kept the replicas identical across the rebuild
    for name in r0["ranks"]:
        assert r0["wiring"]["kinds"][name.split(".")[-1]] == "LowRankLinear"


def test_switched_layer_is_the_plain_torch_svd_of_the_dense_weight(runs):
    r0, r1 = runs
    s = r0["switched"]
    assert s["step"] == r0["switch_step"] and s["dense"] is not None
    rank = r0["ranks"]["net.1"]
    u, sigma, vh = torch.linalg.svd(s["dense"].double(), full_matrices=False)
    expected = (u[:, :rank] * sigma[:rank]) @ vh[:rank]
    product = s["a"].double() @ s["b"].double()
    assert torch.allclose(product, expected, atol=1e-5), float((product - expected).abs().max())
    assert (product - s["dense"].double()).abs().max() > 1e-3  # truncation changes the weight: the check can fail
    assert torch.equal(r1["switched"]["a"], s["a"]) and torch.equal(r1["switched"]["b"], s["b"])


def test_lightning_references_follow_the_rebuild_and_groups_survive(runs):
    from tests.distributed.lightning_workers import STEPS, expected_group_lrs

    for r in runs:
        for wiring in (r["wiring"], r["resumed_wiring"]):
            assert wiring["ddp_over_module"] and wiring["ddp_params"] and wiring["optimizer_params"]
            assert wiring["lightning_optimizer"] and wiring["scheduler_bound"]
            assert wiring["scheduler_last_epoch"] == STEPS
            groups = wiring["groups"]
            assert [g["tag"] for g in groups] == ["decay", "bias"]
            assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
            assert [g["lr"] for g in groups] == pytest.approx(expected_group_lrs(STEPS), rel=1e-9)
            # each switched layer: its weight became two factors (decay group), its bias stays in the bias group
            switched = len(r["ranks"])
            assert [g["n"] for g in groups] == [3 + switched, 3]


def test_resume_after_the_switch_continues_the_same_run(runs):
    from tests.distributed.lightning_workers import CKPT_STEP, STEPS

    for r in runs:
        assert r["switch_step"] < CKPT_STEP
        assert r["global_steps"] == (STEPS, STEPS)
        assert r["resumed_layout"] == r["layout"]
        assert not r["resumed_active"]  # past the switch: the method is finished, nothing re-measured
        assert r["resumed_changes"] == r["changes"]  # the resumed controller reports the switch it came from
        assert r["resumed"] == pytest.approx(r["losses"][CKPT_STEP:], abs=1e-6)
        assert r["resumed_checksum"] == pytest.approx(r["checksum"], abs=1e-6)
        # outside a Trainer, load_lowrank_checkpoint rebuilds the layout and loads every tensor of the file
        assert r["loaded_layout"] == r["layout"] and r["loaded_equal"]


def test_inrank_growth_inside_fit_equals_the_library_ddp_loop(runs):
    """The same InRank job through the documented library loop (DDPBackend + attach + after_step, the same data
    order, accumulation and scheduler, no Lightning): the same growth decisions, losses and final weights."""
    r0, r1 = runs
    assert r0["inrank"]["changes"] == r1["inrank"]["changes"]
    for r in runs:
        run, library = r["inrank"], r["inrank"]["library"]
        assert any(kind == "grow" and capacities for _, kind, _, capacities in run["changes"])  # a growth resharded
        assert run["changes"] == library["changes"]
        assert run["losses"] == pytest.approx(library["losses"], abs=1e-6)
        assert run["checksum"] == pytest.approx(library["checksum"], abs=1e-6)
        wiring = run["wiring"]
        assert wiring["ddp_over_module"] and wiring["ddp_params"] and wiring["optimizer_params"]
        assert wiring["lightning_optimizer"] and wiring["scheduler_bound"]
        assert wiring["kinds"]["1"] == wiring["kinds"]["3"] == "InRankLinear"


def test_fsdp1_strategy_and_unsupported_methods_are_refused_in_one_line(runs):
    """Lightning 2.6 itself refuses FSDP (FSDP1) on CPU; on CUDA the callback refuses it, naming what to use; DLRT
    (extra passes inside the step) is refused naming the allowed methods."""
    for r in runs:
        assert "requires a GPU accelerator" in r["refusals"]["lightning"]
        message = r["refusals"]["callback"]
        assert message.startswith("ConfigError: LowRankCallback: strategy FSDPStrategy is not supported; use "
                                  "strategy='ddp'") and "FSDP2Backend" in message
        assert "\n" not in message
        assert r["refusals"]["method"].startswith("ConfigError: lowrank.strategy: 'dlrt' is not supported by "
                                                  "LowRankCallback")


def test_example_under_torchrun(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "examples" / "lightning_ddp.py"), "--steps", "20", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["switch_step"] == r1["switch_step"] and r0["switch_step"] is not None
    assert r0["ranks"] == r1["ranks"] and r0["ranks"]
    assert r0["global_step"] == 20 and len(r0["losses"]) == 20
    assert all(r0["layers"][n] == "LowRankLinear" for n in r0["ranks"] if n in r0["layers"])
    assert sum(r0["losses"][-4:]) < sum(r0["losses"][:4])
    assert (out / "ckpt" / "last.ckpt").is_file()
    assert "switched at step" in proc.stdout
