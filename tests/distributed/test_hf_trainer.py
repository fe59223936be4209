"""Low-rank training inside `transformers.Trainer.train()` (dist_lowrank.integrations.hf_trainer), 2 real gloo ranks.

One 2-rank job (tests/distributed/hf_trainer_workers.py) is shared by the checks below: on every rank the same
Trainer job without the plugin (the reference: plain `transformers.Trainer` on ZeRO-2, same ds_config and
arguments), then for ZeRO-2 and ZeRO-3 the job with `LowRankTrainer` (Cuttlefish switch at step SWITCH, a
checkpoint at SAVE, TensorBoard) and a resume of that checkpoint with a fresh model. One more job runs
examples/hf_trainer.py under the real `torchrun`. ZeRO-3 is compared with the ZeRO-2 reference (the same
arithmetic per step here: its losses equal the plain ZeRO-2 run's to 1e-5).

DeepSpeed 0.19.8 defaults gradient_clipping to 1.0 and the Trainer fills the ds_config's "auto" from
max_grad_norm: both runs share the ds_config and the TrainingArguments, so they clip alike.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

STEPS, SWITCH, SAVE = 12, 6, 8
STAGES = (2, 3)
TOL = {2: 1e-6, 3: 1e-5}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from tests.distributed.hf_trainer_workers import trainer_runs

    out = tmp_path_factory.mktemp("hf-trainer")
    return run_ranks(trainer_runs, args=(str(out), STAGES, STEPS, SAVE), timeout=280), out


def _losses(rows: dict) -> dict[int, float]:
    return {step: row["loss"] for step, row in rows.items()}


@pytest.mark.parametrize("stage", STAGES)
def test_losses_before_the_switch_equal_the_plain_trainer(job, stage):
    (r0, r1), _ = job
    for r in (r0, r1):
        plain, low = _losses(r["plain"]), _losses(r[stage]["lowrank"])
        assert sorted(plain) == sorted(low) == list(range(1, STEPS + 1))
        for step in range(1, SWITCH + 1):  # the switch happens after step SWITCH's update
            assert low[step] == pytest.approx(plain[step], abs=TOL[stage]), step
        assert abs(low[SWITCH + 2] - plain[SWITCH + 2]) > 1e-4  # the factorized model is another model
        # the Trainer's LR schedule continues through the rebuilt optimizer (companion groups included)
        assert [r[stage]["lowrank"][s]["learning_rate"] for s in range(1, STEPS + 1)] == pytest.approx(
            [r["plain"][s]["learning_rate"] for s in range(1, STEPS + 1)], rel=1e-9)


@pytest.mark.parametrize("stage", STAGES)
def test_switch_inside_train_on_both_ranks_with_one_plan(job, stage):
    (r0, r1), _ = job
    r0, r1 = r0[stage], r1[stage]
    assert r0["events"] == r1["events"]
    (kind, step, ranks), = r0["events"]
    assert (kind, step) == ("switch", SWITCH) and ranks
    assert r0["factorized"] == r1["factorized"] == sorted(ranks)  # the live model: exactly the plan's layers
    before, after = r0["params"]
    assert after < before
    assert r0["groups"] == 4  # the Trainer's two groups (decay / no decay) and their step-0 companions


@pytest.mark.parametrize("stage", STAGES)
def test_loss_keeps_falling_after_the_switch(job, stage):
    (r0, _), _ = job
    low, plain = _losses(r0[stage]["lowrank"]), _losses(r0["plain"])
    after = [low[s] for s in range(SWITCH + 1, STEPS + 1)]
    assert max(after) < low[SWITCH - 2] and sum(after[-3:]) / 3 < low[SWITCH]
    assert abs(low[STEPS] - plain[STEPS]) < 0.1  # the factorized model trains about as well


@pytest.mark.parametrize("stage", STAGES)
def test_every_reference_follows_the_rebuilt_engine(job, stage):
    (r0, r1), _ = job
    for r in (r0[stage], r1[stage]):
        assert all(r["refs"].values()), r["refs"]
        # the grad norm logged after the switch is the new engine's, not the released engine's last one
        assert r["lowrank"][SWITCH + 1]["grad_norm"] != r["lowrank"][SWITCH]["grad_norm"]


@pytest.mark.parametrize("stage", STAGES)
def test_resume_after_the_switch_continues_the_same_run(job, stage):
    (r0, r1), out = job
    r0, r1 = r0[stage], r1[stage]
    manifest = json.loads((out / f"zero{stage}" / f"checkpoint-{SAVE}" / "manifest.json").read_text())
    assert manifest["switch_step"] == SWITCH and sorted(manifest["layout"]) == r0["factorized"]
    assert len(manifest["engine"]["param_groups"]) == 4  # the companions travel with the checkpoint
    for r in (r0, r1):
        assert sorted(r["resumed"]) == list(range(SAVE + 1, STEPS + 1))
        low, resumed = _losses(r["lowrank"]), _losses(r["resumed"])
        for step in resumed:
            assert resumed[step] == pytest.approx(low[step], abs=1e-6), step
            assert r["resumed"][step]["learning_rate"] == pytest.approx(r["lowrank"][step]["learning_rate"], rel=1e-9)
        assert r["resumed_factorized"] == r["factorized"]
        assert "switch" not in r["resumed_events"]  # the resumed controller knows the switch is done


def test_tensorboard_has_the_trainers_loss_scalars(job):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (r0, _), _ = job
    (path,) = r0[2]["tb_files"]  # one writer (the main process)
    acc = EventAccumulator(path)
    acc.Reload()
    scalars = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(scalars) == list(range(1, STEPS + 1))
    low = _losses(r0[2]["lowrank"])
    assert [scalars[s] for s in sorted(scalars)] == pytest.approx([low[s] for s in sorted(low)], rel=1e-6)


def test_inrank_grows_inside_train(job):
    """InRank (Llama, Linear layers): growth inside trainer.train(), one plan on both ranks; before the first growth
    the losses equal a plain Trainer over the same W0 + U·Vᵀ model (prepare_model) that never grows."""
    (r0, r1), _ = job
    a, b = r0["inrank"], r1["inrank"]
    assert a["events"] == b["events"] and a["events"]
    assert {kind for kind, _, _ in a["events"]} == {"grow"}
    first = a["events"][0][1]
    plain, low = _losses(a["plain"]), _losses(a["lowrank"])
    for step in range(1, first + 1):
        assert low[step] == pytest.approx(plain[step], abs=1e-6), step
    assert abs(low[first + 2] - plain[first + 2]) > 1e-5  # grown factors: another model
    assert low[STEPS] < low[first] and all(a["refs"].values()), a["refs"]
    assert [a["lowrank"][s]["learning_rate"] for s in range(1, STEPS + 1)] == pytest.approx(
        [a["plain"][s]["learning_rate"] for s in range(1, STEPS + 1)], rel=1e-9)


def test_library_run_log_when_configured(job):
    """lowrank.logging (ZeRO-3 run): the library's own events next to the Trainer's logs."""
    _, out = job
    log_dir = out / "zero3" / "lowrank_log"
    events = [json.loads(line) for line in (log_dir / "events.jsonl").read_text().splitlines()]
    switches = [e for e in events if e["event"] == "switch"]
    assert [e["step"] for e in switches] == [SWITCH]
    train = [e for e in events if e["event"] == "train"]
    assert train and max(e["step"] for e in train) == STEPS
    assert (log_dir / "summary.json").is_file()


def test_bad_input_is_refused_in_one_line(job):
    (r0, _), _ = job
    errors = r0[2]["errors"]
    assert "lowrank.strategy" in errors["bad_key"] and "\n" not in errors["bad_key"]
    assert errors["twice"].startswith("lowrank: given both")


def test_a_trainer_without_deepspeed_is_refused(tmp_path):
    from transformers import TrainingArguments

    from dist_lowrank.errors import ConfigError
    from dist_lowrank.integrations.hf_trainer import LowRankTrainer
    from examples.hf_common import gpt2

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    with pytest.raises(ConfigError, match="^lowrank: LowRankTrainer supports DeepSpeed engines"):
        LowRankTrainer(model=gpt2(), args=args, lowrank={"strategy": "cuttlefish"})


def test_example_under_torchrun_matches_the_same_job(job, tmp_path):
    """examples/hf_trainer.py, a user's script, under the real torchrun: the same job as the shared run's."""
    from tests.dist_harness import free_port

    (r0, _), _ = job
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "examples/hf_trainer.py", "--out", str(tmp_path), "--steps", str(STEPS), "--save_steps", str(SAVE)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["switch_step"] == SWITCH
    assert result["ranks"] == r0[2]["events"][0][2]
    losses = {int(k): v for k, v in result["losses"].items()}
    assert [losses[s] for s in range(1, STEPS + 1)] == pytest.approx(
        [_losses(r0[2]["lowrank"])[s] for s in range(1, STEPS + 1)], abs=1e-6)
    assert (tmp_path / f"checkpoint-{SAVE}" / "manifest.json").is_file()
