"""Telemetry from the library API (`lowrank.logging`) and numbers that are right on every backend.

The README's example (examples/telemetry_report.py) runs on 2 gloo ranks through DeepSpeed ZeRO-2
(`deepspeed_api.initialize`) and FSDP2 (`attach`); its TensorBoard events are read back with
TensorBoard's own EventAccumulator, the report is rendered by `dist-lowrank report DIR`, and the bytes per
step are compared with the ring model recomputed here from the MLP's layer shapes (not with
telemetry.analytic), parameter counts with the model's. The CLI's InRank-on-FSDP2 run checks the frozen
W0 (counted apart, all-gathered by FSDP2) and that every growth phase has measured traffic.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.dist_harness import run_ranks
from tests.distributed.telemetry_workers import deepspeed_telemetry, fsdp2_telemetry

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]
P = 2  # ranks
LAYERS = {"0": (256, 64), "2": (256, 256), "4": (128, 256), "6": (10, 128)}  # examples.common.mlp: (out, in)
BATCH = 32


def _shapes(ranks: dict[str, int]) -> list[tuple[int, ...]]:
    """Parameter shapes of the MLP with layers in `ranks` factorized (in→r no bias, r→out with bias)."""
    shapes = []
    for name, (m, n) in LAYERS.items():
        if name in ranks:
            shapes += [(ranks[name], n), (m, ranks[name]), (m,)]
        else:
            shapes += [(m, n), (m,)]
    return shapes


def _ring(shapes: list[tuple[int, ...]], backend: str) -> dict[str, float]:
    """Bytes one rank sends per step (fp32, p = 2), written out for these two engines."""
    numel = sum(math.prod(s) for s in shapes)
    if backend == "zero2":  # gradients all-reduced (2(p-1)/p), fp32 partitions all-gathered ((p-1)/p, padded to p)
        return {"all_reduce": 2 * 0.5 * 4 * numel, "all_gather": 0.5 * 4 * (-(-numel // P) * P)}
    padded = sum(-(-s[0] // P) * P * math.prod(s[1:]) for s in shapes)  # FSDP2: dim 0 padded to p
    return {"all_gather": 2 * 0.5 * 4 * padded, "reduce_scatter": 0.5 * 4 * padded}


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def _run(worker, name: str, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"tele_{name}")
    return name, out, run_ranks(worker, args=(str(out),), timeout=240)


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    return _run(deepspeed_telemetry, "zero2", tmp_path_factory)


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    return _run(fsdp2_telemetry, "fsdp2", tmp_path_factory)


@pytest.fixture(params=["zero2", "fsdp2"])
def library_run(request):
    return request.getfixturevalue(f"{request.param}_run")


def test_library_run_writes_the_clis_tags_and_right_numbers(library_run):
    backend, out, (s0, s1) = library_run
    events = _events(out)
    switch = next(e for e in events if e["event"] == "switch")
    ranks = switch["ranks"]
    assert ranks and s0["switch_step"] == s1["switch_step"] == switch["step"]
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    ops = set(_ring(_shapes({}), backend))
    expected = {"train/loss", "perf/step_time", "perf/samples_per_sec", "perf/tokens_per_sec", "lowrank/params",
                "lowrank/trainable_params", "lowrank/compression_ratio", "lowrank/events/switch",
                "lowrank/switch_seconds"}
    expected |= {f"comm/bytes_per_step/{op}" for op in ops} | {f"comm/analytic_bytes_per_step/{op}" for op in ops}
    expected |= {f"lowrank/srank/{n}" for n in ("2", "4")} | {f"lowrank/rank/{n}" for n in ranks}
    assert expected <= tags, expected - tags
    trains = [e for e in events if e["event"] == "train"]
    assert [s.step for s in acc.Scalars("train/loss")] == [e["step"] for e in trains]
    assert [s.value for s in acc.Scalars("train/loss")] == pytest.approx([e["loss"] for e in trains], rel=1e-6)
    assert trains[-1]["step"] == 40  # close() logged the last window
    # Measured bytes per step beside the analytic model, both equal to the ring model of the model's shapes.
    for phase, shapes in (("full", _shapes({})), ("low", _shapes(ranks))):
        ring = _ring(shapes, backend)
        model = next(e for e in events if e["event"] == "comm_model" and e["phase"] == phase)
        assert model["expected"] == pytest.approx(ring, rel=1e-12), phase
        assert model["trainable"] == model["params"] == sum(math.prod(s) for s in shapes)
        windows = [e for e in trains if e["phase"] == phase]
        assert windows and all(e["step"] <= switch["step"] for e in windows) == (phase == "full")
        for window in windows:
            assert window["comm_bytes_per_step"] == pytest.approx(ring, rel=0.02, abs=64), (phase, window)
            assert window["samples_per_sec"] == pytest.approx(BATCH * P / window["step_time"], rel=1e-9)
            assert window["tokens_per_sec"] == pytest.approx(64 * window["samples_per_sec"], rel=1e-9)
    # `dist-lowrank report DIR` renders the directory from these records.
    from dist_lowrank.cli import main

    assert main(["report", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    assert report["summary"]["switch_step"] == switch["step"]
    assert report["summary"]["trainable_params_full"] == sum(math.prod(s) for s in _shapes({}))
    assert report["summary"]["trainable_params_final"] == sum(math.prod(s) for s in _shapes(ranks))
    for phase, shapes in (("full", _shapes({})), ("low", _shapes(ranks))):
        numbers = report["phases"][phase]
        assert numbers["comm_measured_total"] == pytest.approx(sum(_ring(shapes, backend).values()), rel=0.02)
        assert numbers["samples_per_sec"] > 0 and numbers["tokens_per_sec"] == pytest.approx(
            64 * numbers["samples_per_sec"], rel=1e-9)
    cost = report["switch"]["cost"]
    assert len(cost["per_rank"]) == P and all(m["seconds"] > 0 for m in cost["per_rank"])
    assert "## Switch cost (per rank)" in markdown and "| low |" in markdown and "| full |" in markdown


def test_cli_inrank_on_fsdp2_counts_frozen_w0_and_every_growth_phase(tmp_path):
    """configs/inrank_cnn.yaml on FSDP2: measured was 7x the analytic (frozen W0 not modelled), a growth phase
    showed 0 measured (its only log window contained the growth), W0 counted as if it were saved."""
    out = tmp_path / "run"
    overrides = ["run.backend=fsdp2", "run.steps=12", "run.log_every=4", "run.eval_every=0", f"run.out_dir={out}",
                 "run.batch_size=8", "run.limit_train=512", "run.eval_samples=200", "lowrank.inrank.warmup=2",
                 "lowrank.inrank.gap=4"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    cli = Path(sys.executable).parent / "dist-lowrank"
    proc = subprocess.run([str(cli), "train", "configs/inrank_cnn.yaml", *sum((["--override", o] for o in overrides), [])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from dist_lowrank.train.config_file import load_train_config
    from dist_lowrank.train.tasks import build_task

    run, _ = load_train_config(ROOT / "configs" / "inrank_cnn.yaml", overrides)
    dense = build_task(run).model_fn()
    w0 = sum(dense.get_submodule(name).weight.numel() for name in ("classifier.1", "classifier.3"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params_full"] == summary["trainable_params_full"] == sum(p.numel() for p in dense.parameters())
    assert summary["params_final"] - summary["trainable_params_final"] == w0  # the frozen W0, counted apart
    report = json.loads((out / "report.json").read_text())
    growths = [e["step"] for e in _events(out) if e["event"] == "grow"]
    assert growths, "the shrunk run grows at least once"
    assert {f"grown@{s}" for s in growths if s < run.steps} <= set(report["phases"])
    for name, phase in report["phases"].items():
        assert phase["comm_measured_total"] > 0, name
        assert phase["comm_measured_total"] == pytest.approx(phase["comm_analytic_total"], rel=1e-3), name



def test_exact_monitor_on_fsdp2_shards_is_refused_on_every_rank_before_training(fsdp2_run):
    """(On replicated weights exact is exact: tests/unit/test_telemetry_keys.py.)"""
    for result in fsdp2_run[2]:
        assert result["exact_refused"].startswith("ConfigError: lowrank.monitor.method: 'exact' needs whole weights")
