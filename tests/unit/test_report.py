"""Telemetry read back: TensorBoard events (TensorBoard's own reader), report numbers = the run's logs."""
from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_lowrank.telemetry.report import ReportError, load_events, write_report
from dist_lowrank.train.config_file import load_train_config
from dist_lowrank.train.loop import train

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run, lowrank = load_train_config("configs/demo.yaml", [
        "run.steps=60", "run.width=8", "run.hidden=64", "run.eval_samples=500", "run.eval_every=0",
        "run.log_every=10", f"run.out_dir={out}", "run.limit_train=4000", "lowrank.monitor.cadence_steps=10",
        "lowrank.cuttlefish.min_switch_step=20", "lowrank.cuttlefish.max_switch_step=30",
        "lowrank.switch.profile_layers=false"])
    train(run, lowrank)
    return out


def test_tensorboard_tags_read_back(run_dir):
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    layers = next(e for e in events if e["event"] == "estimate")["sranks"]
    switch = next(e for e in events if e["event"] == "switch")
    expected = {"train/loss", "perf/step_time", "perf/samples_per_sec", "perf/tokens_per_sec", "lowrank/params",
                "lowrank/compression_ratio", "lowrank/events/switch", "eval/val_loss", "eval/val_acc"}
    expected |= {f"lowrank/srank/{n}" for n in layers} | {f"lowrank/rank/{n}" for n in switch["ranks"]}
    assert expected <= tags, expected - tags
    logged = [(e["step"], e["loss"]) for e in events if e["event"] == "train"]
    scalars = acc.Scalars("train/loss")
    assert [s.step for s in scalars] == [step for step, _ in logged]
    assert [s.value for s in scalars] == pytest.approx([loss for _, loss in logged], rel=1e-6)
    assert [s.value for s in acc.Scalars(f"lowrank/rank/{next(iter(switch['ranks']))}")] == \
        [next(iter(switch["ranks"].values()))]


def test_report_numbers_match_the_logs(run_dir):
    report = write_report(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    events = load_events(run_dir)
    assert report["summary"]["params_final"] == summary["params_final"] < summary["params_full"]
    assert report["switch"]["step"] == summary["switch_step"]
    assert report["compression"] == pytest.approx(summary["params_full"] / summary["params_final"])
    trains = [e for e in events if e["event"] == "train"]
    assert report["phases"]["full"]["params"] == trains[0]["params"]
    assert report["phases"]["low"]["params"] == trains[-1]["params"] == summary["params_final"]
    estimates = [e for e in events if e["event"] == "estimate"]
    for name, points in report["srank_trajectories"].items():
        assert points == [[e["step"], e["sranks"][name]] for e in estimates]
    ranks = {layer["layer"]: layer["rank"] for layer in report["layers"] if layer["rank"]}
    assert ranks == summary["ranks"]
    per_rank = report["switch"]["cost"]["per_rank"]
    assert len(per_rank) == 1 and per_rank[0]["seconds"] == report["switch"]["cost"]["seconds"]
    train_s = (summary["final_eval"] or {}).get("train_s") or summary["wall_seconds"]
    assert report["end_to_end_vs_own_full_pace"] == pytest.approx(
        summary["steps"] * report["phases"]["full"]["step_time"] / train_s)
    markdown = (run_dir / "report.md").read_text()
    assert f"{report['end_to_end_vs_own_full_pace']:,.2f}× (estimate" in markdown
    assert f"{summary['params_full']:,}" in markdown and f"switch at step {summary['switch_step']}" in markdown
    import matplotlib.image

    for png in ("srank.png", "savings.png"):
        image = matplotlib.image.imread(run_dir / png)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


def test_bad_run_directories_give_one_line_errors(tmp_path):
    with pytest.raises(ReportError, match="not a directory"):
        load_events(tmp_path / "nope")
    with pytest.raises(ReportError, match="events.jsonl: missing"):
        load_events(tmp_path)
    (tmp_path / "events.jsonl").write_text('{"event": "config"}\n')
    with pytest.raises(ReportError, match="did not finish"):
        load_events(tmp_path)
    (tmp_path / "events.jsonl").write_text('{"event": "config"}\n{"event": "trai')
    with pytest.raises(ReportError, match=":2: not JSON") as info:
        load_events(tmp_path)
    assert "\n" not in str(info.value)


def test_rank_adaptive_trajectories_reach_tensorboard_and_the_report(tmp_path):
    """DLRT logs a rank_update event whenever a rank or capacity changes: TensorBoard has each layer's rank and
    capacity at those steps, the report's trajectory is the events' ranks, `ranks.png` and its table exist."""
    run, lowrank = load_train_config("configs/dlrt_mlp_fmnist.yaml", [
        "run.backend=local", "run.world_size=1", "run.steps=12", "run.batch_size=16", "run.limit_train=512",
        "run.eval_samples=200", "run.eval_every=0", "run.log_every=4", "run.lr=0.01", f"run.out_dir={tmp_path}",
        "lowrank.dlrt.init_rank=8", "lowrank.dlrt.theta=0.45", "lowrank.dlrt.capacity_multiple=1"])
    train(run, lowrank)
    updates = [e for e in load_events(tmp_path) if e["event"] == "rank_update"]
    assert len(updates) > 2, "the job must change ranks"
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    report = write_report(tmp_path)
    for name in updates[0]["ranks"]:
        assert [(s.step, s.value) for s in acc.Scalars(f"lowrank/rank/{name}")] == \
            [(e["step"], e["ranks"][name]) for e in updates]
        assert [s.value for s in acc.Scalars(f"lowrank/capacity/{name}")] == [e["capacities"][name] for e in updates]
        expected = []
        for e in updates:
            if not expected or expected[-1][1] != e["ranks"][name]:
                expected.append([e["step"], e["ranks"][name]])
        assert report["rank_trajectories"][name] == expected
    assert [s.value for s in acc.Scalars("comm/bytes_per_step/integrator")] == \
        [e["integrator_bytes"] for e in updates]
    assert "## Ranks over time" in (tmp_path / "report.md").read_text()
    assert report["integrator_bytes"] == [[e["step"], e["integrator_bytes"]] for e in updates]
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "ranks.png").std() > 0
