"""tools/bench_monitor.py, bench_switch_cost.py, bench_comm.py and bench_end_to_end.py run end to end at their
smallest settings (real gloo ranks, so marked dist) and write JSON with the expected keys and sane values:
sharded monitor bytes below a full gather's, counted gather bytes equal to (p-1)/p·4·m·n, Lanczos srank within
1% of the exact SVD, a switch that takes measurable time and memory, measured comm within 2% of the analytic
model, and end-to-end ratios computed from the runs they summarize."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


def _run(tool: str, args: list[str], out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "tools" / tool), *args, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, f"{tool} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_bench_monitor_smallest(tmp_path: Path) -> None:
    data = _run("bench_monitor.py", ["--gpt-backends", "zero2", "--steps", "2", "--estimates", "1", "--warmup", "1",
                                     "--repeats", "1", "--widths", "256", "--width-backends", "fsdp2",
                                     "--methods", "lanczos:30"], tmp_path / "monitor.json")
    assert {"machine", "settings", "gpt", "widths", "fits"} <= set(data)
    (gpt,) = data["gpt"]
    assert gpt["backend"] == "zero2" and gpt["layers"] == 16 and gpt["cadence"] == 20
    for key in ("step_s", "estimate_s", "estimate_per_step", "amortized_overhead"):
        assert set(gpt[key]) == {"median", "min", "max"} and gpt[key]["median"] > 0
    assert gpt["amortized_overhead"]["median"] == pytest.approx(gpt["estimate_per_step"]["median"] / 20)
    assert gpt["amortized_overhead_default"]["median"] == pytest.approx(gpt["estimate_per_step"]["median"] / 50)
    # ZeRO-2 weights are replicated: each owner rank estimates its layers alone, no collective Krylov steps
    assert gpt["default_cadence"] == 50 and gpt["monitor_iterations"] == 0 and gpt["monitor_collectives"] == 1
    assert gpt["worst_rel_error"] < 0.01
    (row,) = data["widths"]
    assert (row["backend"], row["width"], row["method"]) == ("fsdp2", 256, "lanczos:30")
    assert 0 < row["sharded_bytes"] < row["gathered_bytes"]
    assert row["gathered_bytes"] == pytest.approx(row["gathered_bytes_analytic"], abs=64)
    # FSDP2 rows are whole: 30 Lanczos steps on WᵀW, one all-reduce of the two n-vectors (fp64) per step,
    # + the (norm, non-finite, cut-row) table
    assert row["monitor_payload_bytes"] == 30 * 8 * (256 + 256) + 8 * 3 * 2
    assert row["worst_rel_error"] < 0.01
    assert row["sharded_s"]["median"] > 0 and row["gathered_s"]["median"] > 0


def test_bench_switch_cost_smallest(tmp_path: Path) -> None:
    data = _run("bench_switch_cost.py", ["--backends", "fsdp2", "--layers", "2", "--repeats", "1", "--steps", "2",
                                         "--warmup", "1", "--gpt-backends", ""], tmp_path / "switch.json")
    assert {"machine", "settings", "rows", "gpt"} <= set(data) and data["gpt"] == []
    (row,) = data["rows"]
    assert (row["backend"], row["layers"], row["width"]) == ("fsdp2", 2, 512)
    assert row["switch_s"]["median"] > 0 and row["step_s"]["median"] > 0
    assert row["latency_steps"]["median"] == pytest.approx(row["switch_s"]["median"] / row["step_s"]["median"])
    assert row["latency_steps"]["median"] > 0
    assert row["steady_peak_rss_mb"]["median"] > 0 and row["memory_ratio"]["median"] > 0
    per_rank = row["per_rank"]
    assert sorted(r["rank"] for r in per_rank) == [0, 1]
    assert all(r["measurements"]["params_after"] < r["measurements"]["params_before"] for r in per_rank)


TINY = str(ROOT / "tests" / "e2e" / "tiny_gpt.yaml")  # 2 ranks, ZeRO-2, 1-layer GPT, 12 steps


def test_bench_comm_tiny(tmp_path: Path) -> None:
    data = _run("bench_comm.py", ["--config", TINY, "--backends", "zero2", "--override", "run.steps=12",
                                  "--override", "run.log_every=2", "--override", "lowrank.monitor.cadence_steps=2",
                                  "--override", "lowrank.cuttlefish.max_switch_step=6"], tmp_path / "comm.json")
    row = data["zero2"]
    # Both phases ran, the counter agrees with the analytic ring model, and the factorized phase sends less.
    assert abs(row["diff_full"]) < 0.02 and abs(row["diff_low"]) < 0.02
    assert row["params_low"] < row["params_full"] and row["full_over_low"] > 1.0
    assert row["full_over_low"] == pytest.approx(row["full_measured"] / row["low_measured"])


def test_bench_end_to_end_tiny(tmp_path: Path) -> None:
    data = _run("bench_end_to_end.py", ["--config", TINY, "--variants", "full_rank,cuttlefish", "--override",
                                        "run.eval_samples=16"], tmp_path / "e2e.json")
    full, low = data["full_rank"], data["cuttlefish"]
    (f,), (c,) = full["runs"], low["runs"]
    assert f["switch_step"] is None and c["switch_step"] == 8 and c["params"] < f["params"]
    assert low["speedup_wall"] == pytest.approx(f["wall_s"] / c["wall_s"])
    assert low["tokens_ratio"] == pytest.approx(c["tokens_per_s"] / f["tokens_per_s"])
    assert low["val_loss_rel"] == pytest.approx(c["val_loss"] / f["val_loss"] - 1)
    assert all(r["val_loss"] > 0 and r["wall_s"] > 0 for r in (f, c))
