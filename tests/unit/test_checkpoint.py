"""Checkpoint manifest, commit protocol and resume refusals in one process (RELIABILITY 10, 12, bad input)."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from torch import nn

from dist_lowrank.checkpoint.manifest import apply_layout, check_layout, layout_of, read_manifest
from dist_lowrank.checkpoint.store import COMMIT, begin_save, commit, committed_steps, latest_committed, \
    resolve_checkpoint
from dist_lowrank.errors import CheckpointError, ConfigError
from dist_lowrank.layers import LowRankLinear
from dist_lowrank.methods.inrank.layer import InRankLinear
from dist_lowrank.train.config_file import load_train_config
from dist_lowrank.train.loop import train
from tests.distributed.ckpt_common import CKPT, CONFIG, losses

pytestmark = pytest.mark.unit
LOCAL = ["run.backend=local", "run.world_size=1", "run.batch_size=8"] + CKPT


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-process tiny GPT run with checkpoints at steps 4, 8 (right after the switch) and 12."""
    out = tmp_path_factory.mktemp("run")
    summary = train(*load_train_config(CONFIG, LOCAL + [f"run.out_dir={out}"]))
    return out, summary


def _copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    return out


def test_commit_marker_decides_what_is_latest(tmp_path, caplog):
    for step in (4, 8):
        directory = begin_save(tmp_path, step)
        (directory / "payload").write_text("x")
        commit(tmp_path, step)
    assert committed_steps(tmp_path) == [4, 8] and (tmp_path / "latest").read_text().strip() == "8"
    begin_save(tmp_path, 12)  # a save killed before its COMMIT
    with caplog.at_level(logging.WARNING, logger="dist_lowrank"):
        assert latest_committed(tmp_path) == tmp_path / "step_000008"
    assert "step_000012: incomplete checkpoint" in caplog.text
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_checkpoint(str(tmp_path / "step_000012"), tmp_path)
    assert resolve_checkpoint("never", tmp_path) is None


def test_keep_removes_only_older_committed_checkpoints(tmp_path):
    for step in (2, 4, 6):
        begin_save(tmp_path, step)
        commit(tmp_path, step, keep=2)
    assert committed_steps(tmp_path) == [4, 6]


def test_auto_resume_from_the_latest_complete_checkpoint_continues_bitwise(finished_run, tmp_path):
    """Scenario 10 in one process: step 12's checkpoint lost its COMMIT (killed save), so `resume: auto`
    starts from step 8 and the rest of the run equals the uninterrupted one."""
    out = _copy(finished_run, tmp_path)
    (out / "checkpoints" / "step_000012" / COMMIT).unlink()
    summary = train(*load_train_config(CONFIG, LOCAL + [f"run.out_dir={out}", "run.resume=auto"]))
    assert summary["switch_step"] == finished_run[1]["switch_step"] == 8
    assert summary["ranks"] == finished_run[1]["ranks"]
    assert losses(out) == losses(finished_run[0]), "steps 1-8 kept from the first attempt, 9-12 recomputed equal"


def test_changed_config_is_refused_with_the_keys_named_unless_allowed(finished_run, tmp_path):
    """Scenario 12: thresholds, targets or strategy changed since the checkpoint."""
    out = _copy(finished_run, tmp_path)
    changed = [f"run.out_dir={out}", "lowrank.cuttlefish.threshold=0.3", "lowrank.target_modules=[mlp.c_fc]"]
    with pytest.raises(CheckpointError, match=r"lowrank.cuttlefish.threshold, lowrank.target_modules"):
        train(*load_train_config(CONFIG, LOCAL + changed))
    with pytest.raises(CheckpointError, match=r"lowrank.strategy"):
        train(*load_train_config(CONFIG, LOCAL + [f"run.out_dir={out}", "lowrank.strategy=fixed"]))
    # steps, cadences and out_dir may change: training continues from step 12 to 14
    summary = train(*load_train_config(CONFIG, LOCAL + [f"run.out_dir={out}", "run.steps=14"]))
    assert summary["steps"] == 14 and max(losses(out)) == 14
    allowed = train(*load_train_config(CONFIG, LOCAL + changed + ["run.allow_config_change=true", "run.steps=15"]))
    assert allowed["steps"] == 15


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "manifest.json").unlink(), "manifest.json: missing"),
    (lambda d: (d / "manifest.json").write_text('{"step": 8, '), "not valid JSON"),
    (lambda d: (d / "manifest.json").write_text(json.dumps({"format_version": 99})), "format_version 99"),
    (lambda d: (d / "state.pt").unlink(), "state.pt: missing"),
])
def test_bad_checkpoint_gives_one_named_error(finished_run, tmp_path, damage, message):
    out = _copy(finished_run, tmp_path)
    directory = out / "checkpoints" / "step_000008"
    damage(directory)
    with pytest.raises(CheckpointError, match=message) as info:
        train(*load_train_config(CONFIG, LOCAL + [f"run.out_dir={out}", f"run.resume={directory}"]))
    assert "\n" not in str(info.value)


def test_manifest_travels_inside_the_engine_checkpoint(finished_run):
    directory = finished_run[0] / "checkpoints" / "step_000008"
    inside = torch.load(directory / "state.pt", weights_only=False)["manifest"]
    assert json.loads(inside) == json.loads((directory / "manifest.json").read_text())
    manifest = read_manifest(directory)
    assert manifest.step == 8 and manifest.switch_step == 8 and manifest.phase == "low"
    assert {n: e["rank"] for n, e in manifest.layout.items()} == finished_run[1]["ranks"]


def test_apply_layout_builds_saved_shapes_and_names_wrong_layers():
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    layout = {"0": {"type": "lowrank", "rank": 3}}
    apply_layout(model, layout)
    assert isinstance(model[0], LowRankLinear) and model[0].rank == 3
    check_layout(model, layout)
    with pytest.raises(CheckpointError, match=r"layout\.0: checkpoint has .*'rank': 4"):
        check_layout(model, {"0": {"type": "lowrank", "rank": 4}})
    with pytest.raises(CheckpointError, match=r"layout\.5: the model has no such layer"):
        apply_layout(nn.Sequential(nn.Linear(4, 4)), {"5": {"type": "lowrank", "rank": 1}})
    with pytest.raises(CheckpointError, match=r"layout\.1: saved as factorized, but the model's layer is ReLU"):
        apply_layout(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), {"1": {"type": "lowrank", "rank": 1}})
    with pytest.raises(CheckpointError, match=r"layout\.0: saved as 'inrank', but the model's layer is Linear .*prepare_model"):
        apply_layout(nn.Sequential(nn.Linear(4, 4)), {"0": {"type": "inrank", "width": 2, "capacity": 4}})


def test_apply_layout_restores_inrank_capacity_and_width():
    model = nn.Sequential(InRankLinear(16, 12, rank=2, capacity=4))
    apply_layout(model, {"0": {"type": "inrank", "width": 6, "capacity": 8}})
    assert (model[0].rank, model[0].capacity) == (6, 8)
    assert layout_of(model) == {"0": {"type": "inrank", "width": 6, "capacity": 8}}


def test_run_config_checkpoint_keys_are_validated():
    with pytest.raises(ConfigError, match=r"run.checkpoint_every"):
        load_train_config(CONFIG, ["run.checkpoint_every=-1"])
