"""tools/bench_monitor.py, bench_switch_cost.py, bench_comm.py and bench_end_to_end.py run end to end at their
smallest settings (real gloo ranks, so marked dist). Their numbers are checked against what the test knows
without the tool: the models' sizes and the factorized sizes written out, the ring algorithms' bytes per element,
the tool's own wall time as a bound on every time it reports (a unit slip fails), rows recomputed from the
per-rank records; ratios are checked against the runs they summarize. The end-to-end arithmetic (time-to-quality,
ratios, variants) is checked on hand-made records, and bench_step_share.py on a 2-layer 32-wide GPT (unit)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))


def _run(tool: str, args: list[str], out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "tools" / tool), *args, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, f"{tool} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.dist
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
    # a full gather of the width-256 square weights on 2 ranks: (p−1)/p · 4 bytes · 256² per layer
    layers = data["settings"]["layers"]
    assert row["gathered_bytes"] == pytest.approx(0.5 * 4 * 256 * 256 * layers, abs=64)
    # FSDP2 rows are whole: 30 Lanczos steps on WᵀW, one all-reduce of the two n-vectors (fp64) per step,
    # + the (norm, non-finite, cut-row) table
    assert row["monitor_payload_bytes"] == 30 * 8 * (256 + 256) + 8 * 3 * 2
    assert row["worst_rel_error"] < 0.01
    assert row["sharded_s"]["median"] > 0 and row["gathered_s"]["median"] > 0


@pytest.mark.dist
def test_bench_switch_cost_smallest(tmp_path: Path) -> None:
    start = time.perf_counter()
    data = _run("bench_switch_cost.py", ["--backends", "fsdp2", "--layers", "2", "--repeats", "1", "--steps", "2",
                                         "--warmup", "1", "--gpt-backends", ""], tmp_path / "switch.json")
    elapsed = time.perf_counter() - start
    assert {"machine", "settings", "rows", "gpt"} <= set(data) and data["gpt"] == []
    (row,) = data["rows"]
    assert (row["backend"], row["layers"], row["width"]) == ("fsdp2", 2, 512)
    per_rank = row["per_rank"]
    assert sorted(r["rank"] for r in per_rank) == [0, 1]
    # the row is the slower rank's time and the larger rank's memory, recomputed here from the per-rank records
    step, switch = max(r["step_s"] for r in per_rank), max(r["switch_s"] for r in per_rank)
    assert row["step_s"]["median"] == step and row["switch_s"]["median"] == switch
    assert row["latency_steps"]["median"] == pytest.approx(switch / step)
    assert row["steady_peak_rss_mb"]["median"] == max(r["steady_peak_rss_mb"] for r in per_rank)
    # seconds, not milliseconds: 1 warm-up + 2 steps + the switch + 3 steps fit in the tool's own wall time, and
    # the switch the tool timed is the one the pipeline timed inside it
    assert 0 < 6 * step + switch < elapsed
    for r in per_rank:
        assert r["measurements"]["seconds"] <= r["switch_s"] < r["measurements"]["seconds"] + 0.5
    # the model of tools/bench_switch.py: Linear(32, 512), 2 × Linear(512, 512), Linear(512, 8); the 2 hidden
    # layers at rank 512 // 8 = 64 → 2 · 64 · (512 + 512) weights instead of 2 · 512², biases kept
    dense = 32 * 512 + 512 + 2 * (512 * 512 + 512) + 512 * 8 + 8
    low = dense - 2 * 512 * 512 + 2 * 64 * (512 + 512)
    assert all((r["measurements"]["params_before"], r["measurements"]["params_after"]) == (dense, low)
               for r in per_rank)
    # RSS in MiB of a process with torch loaded (> 100 MiB), and a switch of 2 layers does not double it
    assert all(100 < r["steady_peak_rss_mb"] and 0.9 < r["memory_ratio"] < 2 for r in per_rank)


TINY = str(ROOT / "tests" / "e2e" / "tiny_gpt.yaml")  # 2 ranks, ZeRO-2, 1-layer GPT, 12 steps


@pytest.mark.dist
def test_bench_comm_tiny(tmp_path: Path) -> None:
    data = _run("bench_comm.py", ["--config", TINY, "--backends", "zero2", "--override", "run.steps=12",
                                  "--override", "run.log_every=2", "--override", "lowrank.monitor.cadence_steps=2",
                                  "--override", "lowrank.cuttlefish.max_switch_step=6"], tmp_path / "comm.json")
    row = data["zero2"]
    # Both phases ran, the counter agrees with the analytic ring model, and the factorized phase sends less.
    assert abs(row["diff_full"]) < 0.02 and abs(row["diff_low"]) < 0.02
    assert row["params_low"] < row["params_full"]
    from dist_lowrank.train.config_file import load_train_config
    from dist_lowrank.train.tasks import build_task

    run_cfg, _ = load_train_config(TINY)
    assert row["params_full"] == sum(p.numel() for p in build_task(run_cfg).model_fn().parameters())
    # ZeRO-2 on 2 ranks, fp32, written here from the ring algorithms (not telemetry/analytic.py): the gradients'
    # all-reduce sends 2·(p−1)/p·4 bytes per element, the updated partitions' all-gather (p−1)/p·4; a few
    # bytes more for the scalars (loss, overflow flag)
    for phase in ("full", "low"):
        n, by_op = row[f"params_{phase}"], row[f"by_op_{phase}"]
        assert set(by_op) == {"all_reduce", "all_gather"}
        assert 0 <= by_op["all_reduce"] - 2 * 0.5 * 4 * n <= 64 and 0 <= by_op["all_gather"] - 0.5 * 4 * n <= 64
        assert row[f"{phase}_measured"] == by_op["all_reduce"] + by_op["all_gather"]
    assert row["full_over_low"] == pytest.approx(row["full_measured"] / row["low_measured"])


@pytest.mark.dist
def test_bench_end_to_end_tiny(tmp_path: Path) -> None:
    start = time.perf_counter()
    data = _run("bench_end_to_end.py", ["--config", TINY, "--variants", "full_rank,cuttlefish", "--repeats", "1",
                                        "--eval-every", "4", "--override", "run.eval_samples=16",
                                        "--markdown", str(tmp_path / "rows.md")], tmp_path / "e2e.json")
    elapsed = time.perf_counter() - start
    assert data["settings"]["eval_every"] == 4 and data["settings"]["repeats"] == 1
    assert data["settings"]["variants"]["full_rank"][-1] == "run.eval_every=4"
    full, low = data["variants"]["full_rank"], data["variants"]["cuttlefish"]
    (f,), (c,) = full["runs"], low["runs"]
    assert f["switch_step"] is None and c["switch_step"] == 8 and c["params"] < f["params"]
    from dist_lowrank.train.config_file import load_train_config
    from dist_lowrank.train.tasks import build_task

    run_cfg, _ = load_train_config(TINY)  # the model the tool trained, built here: its size is the full run's
    assert f["params"] == sum(p.numel() for p in build_task(run_cfg).model_fn().parameters())
    assert low["speedup_wall"] == pytest.approx(f["wall_s"] / c["wall_s"])
    assert low["tokens_ratio"] == pytest.approx(c["tokens_per_s"] / f["tokens_per_s"])
    assert low["val_loss_rel"] == pytest.approx(c["val_loss"] / f["val_loss"] - 1)
    # seconds measured by the runs themselves: both fit in the tool's wall time; tokens/s after the switch
    # in tokens per second: the 4 steps after it (batch 4 × 32 tokens per rank) took less than the whole run
    assert 0 < f["wall_s"] + c["wall_s"] < elapsed
    assert c["tokens_per_s"] * c["wall_s"] > (12 - 8) * 4 * 32
    # a char model's loss at this size: below the uniform guess over the vocabulary, above zero
    vocab = build_task(run_cfg).model_fn().lm_head.out_features
    assert all(0.5 < r["val_loss"] < math.log(vocab) + 0.5 for r in (f, c))
    # the eval events the tool asked for, the last one the final eval
    for r in (f, c):
        assert [e["step"] for e in r["evals"]] == [4, 8, 12]
        assert r["evals"][-1]["val_loss"] == pytest.approx(r["val_loss"])
    # training time and OOD loss when the runs log them (else n/a: None), ratios from the same runs
    if f["train_s"] is not None:
        assert 0 < f["train_s"] <= f["wall_s"] and low["speedup_train"] == pytest.approx(f["train_s"] / c["train_s"])
        (ttq,) = low["time_to_quality"]
        assert ttq["target"] == f["val_loss"] and ttq["full_s"] <= f["train_s"]
        assert ttq["status"] in ("reached", "not reached")
    else:
        assert low["speedup_train"] is None and low["time_to_quality"][0]["status"] == "n/a"
    if f["ood_val_loss"] is not None:
        assert low["ood_val_loss_rel"] == pytest.approx(c["ood_val_loss"] / f["ood_val_loss"] - 1)
    table = (tmp_path / "rows.md").read_text()
    assert "| full_rank |" in table and "| cuttlefish |" in table and "run.eval_samples=16" in table


@pytest.mark.unit
def test_bench_end_to_end_bad_variant_fails_before_any_run() -> None:
    cmd = [sys.executable, str(ROOT / "tools" / "bench_end_to_end.py"), "--config", TINY, "--variants", "full_rank",
           "--variant", "typo=lowrank.switch.no_such_key=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "variant typo" in proc.stderr and "no_such_key" in proc.stderr
    assert "[1/" not in proc.stdout  # nothing was trained


def _evals(*points: tuple[int, float, float]) -> list[dict]:
    return [{"step": s, "val_loss": v, "train_s": t} for s, v, t in points]


@pytest.mark.unit
def test_time_to_quality_first_eval_at_or_below_target() -> None:
    from bench_end_to_end import NA, NOT_REACHED, REACHED, time_to_quality

    evals = _evals((30, 2.0, 11.0), (10, 3.0, 4.0), (20, 2.5, 7.5))  # out of order: sorted by step
    assert time_to_quality(evals, 2.5) == (REACHED, 7.5)
    assert time_to_quality(evals, 2.7) == (REACHED, 7.5)
    assert time_to_quality(evals, 3.0) == (REACHED, 4.0)
    assert time_to_quality(evals, 1.9) == (NOT_REACHED, None)
    assert time_to_quality(evals, None) == (NA, None)
    assert time_to_quality([], 2.0) == (NA, None)
    no_time = [{"step": 10, "val_loss": 1.0}]  # runs from before train_s was logged
    assert time_to_quality(no_time, 2.0) == (NA, None)


def _run_record(wall: float, train: float, tokens: float, val: float, ood, evals: list[dict]) -> dict:
    return {"wall_s": wall, "train_s": train, "tokens_per_s": tokens, "val_loss": val, "ood_val_loss": ood,
            "params": 100, "switch_step": None, "evals": evals}


@pytest.mark.unit
def test_compare_ratios_and_paired_time_to_quality() -> None:
    from bench_end_to_end import compare, table_rows, ttq_text

    # full rank reaches its final 2.0 only at the end (20 s, 24 s); the variant reaches 2.0 at 8 s in repeat 0,
    # at 16 s in repeat 1 (target 1.9 there: full's final loss of that repeat)
    base = [_run_record(100, 20, 1000, 2.0, 3.0, _evals((10, 2.5, 10), (20, 2.0, 20))),
            _run_record(120, 24, 1000, 1.9, 3.2, _evals((10, 2.4, 12), (20, 1.9, 24)))]
    runs = [_run_record(50, 10, 2500, 2.02, 3.1, _evals((10, 2.0, 8), (20, 1.95, 10))),
            _run_record(70, 14, 1500, 1.96, 3.1, _evals((10, 2.2, 7), (20, 1.9, 16)))]
    out = compare(base, runs)
    assert out["speedup_wall"] == pytest.approx(110 / 60)
    assert out["speedup_train"] == pytest.approx(22 / 12)
    assert out["tokens_ratio"] == pytest.approx(2000 / 1000)
    assert out["val_loss_rel"] == pytest.approx(1.99 / 1.95 - 1)
    assert out["ood_val_loss_rel"] == pytest.approx(3.1 / 3.1 - 1)
    t0, t1 = out["time_to_quality"]
    assert (t0["target"], t0["full_s"], t0["seconds"], t0["speedup"]) == (2.0, 20, 8, pytest.approx(2.5))
    assert (t1["target"], t1["full_s"], t1["seconds"], t1["speedup"]) == (1.9, 24, 16, pytest.approx(1.5))
    assert out["ttq_speedup"] == pytest.approx(2.0)
    assert ttq_text(out["time_to_quality"], "speedup") == "2.00x [1.50–2.50]"
    # full rank against itself: 1x everywhere
    same = compare(base, base)
    assert same["speedup_wall"] == 1 and same["ttq_speedup"] == 1 and same["val_loss_rel"] == 0
    # a variant that never gets there is reported so, not dropped; a missing OOD loss is n/a
    worse = [_run_record(50, 10, 2500, 2.3, None, _evals((10, 2.6, 5), (20, 2.3, 10)))] * 2
    out = compare(base, worse)
    assert out["ttq_speedup"] is None and out["ood_val_loss_rel"] is None
    assert [t["status"] for t in out["time_to_quality"]] == ["not reached", "not reached"]
    assert ttq_text(out["time_to_quality"], "speedup") == "not reached"
    half = compare(base, [runs[0], worse[1]])
    assert half["ttq_speedup"] is None
    assert ttq_text(half["time_to_quality"], "speedup") == "2.50x (1/2 not reached)"
    rows = table_rows({"full_rank": {"runs": base, **same}, "low": {"runs": worse, **out}})
    assert len(rows) == 4 and rows[0].count("|") == rows[1].count("|") == rows[3].count("|")
    assert "| not reached | not reached |" in rows[3] and "| n/a |" in rows[3]  # OOD n/a


@pytest.mark.unit
def test_verdicts_by_strategy() -> None:
    from bench_end_to_end import verdicts

    def row(wall, tokens, val_rel, ttq):
        return {"speedup_wall": wall, "tokens_ratio": tokens, "val_loss_rel": val_rel, "ttq_speedup": ttq,
                "time_to_quality": [{"status": "not reached", "seconds": None, "speedup": None}]}
    table = {"full_rank": row(1, 1, 0, 1), "cuttlefish": row(1.6, 2.1, 0.019, 1.7),
             "inrank": row(1.35, 1.3, 0.03, None), "cf_lr": row(1.4, 2.5, 0.01, None)}
    lines = verdicts(table, {"full_rank": "none", "cuttlefish": "cuttlefish", "inrank": "inrank",
                             "cf_lr": "cuttlefish"})
    assert lines == [
        "cuttlefish: wall >= 1.5x met; tokens/s >= 2x met; time-to-quality >= 1.5x met; val loss within 2% met",
        "inrank: wall >= 1.3x met; val loss within 2% NOT met",
        "cf_lr: wall >= 1.5x NOT met; tokens/s >= 2x met; time-to-quality >= 1.5x not reached; "
        "val loss within 2% met"]


@pytest.mark.unit
def test_parse_variant_and_spread() -> None:
    from bench_common import median_or_none, spread
    from bench_end_to_end import parse_variant

    assert parse_variant("cf_proj=lowrank.switch.factor_moments=projected run.lr=0.001") == \
        ("cf_proj", ["lowrank.switch.factor_moments=projected", "run.lr=0.001"])
    assert parse_variant("plain=") == ("plain", [])
    for bad, word in (("nokey", "expected NAME"), ("cuttlefish=run.lr=1", "built-in"), ("x=run.lr", "key=value"),
                      ("a b=run.lr=1", "expected NAME")):
        with pytest.raises(SystemExit, match=word):
            parse_variant(bad)
    assert spread([3.0, 1.0, 2.0]) == "2 [1–3]" and spread([2.5, 2.5]) == "2.5" and spread([1.0, None]) == "n/a"
    assert median_or_none([1.0, 3.0]) == 2.0 and median_or_none([1.0, None]) is None and median_or_none([]) is None


@pytest.mark.unit
def test_step_share_arithmetic() -> None:
    from bench_step_share import amdahl_bound, rank_at

    assert amdahl_bound(0.5) == pytest.approx(2.0)
    assert amdahl_bound(0.5, 2.0) == pytest.approx(1 / 0.75)
    assert amdahl_bound(0.0, 10.0) == 1.0 and amdahl_bound(1.0, 4.0) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        amdahl_bound(1.5)
    assert rank_at(0.25, 128, 512) == 32 and rank_at(0.5, 96, 32) == 16 and rank_at(0.01, 32, 32) == 1


@pytest.mark.unit
def test_bench_step_share_two_layer_32_wide(tmp_path: Path) -> None:
    out = tmp_path / "share.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_step_share.py"), "--iters", "3", "--warmup", "1",
           "--rank-ratio", "0.25,0.5", "--json", str(out)]
    for item in ("run.n_layer=2", "run.n_embd=32", "run.n_head=2", "run.block_size=32", "run.batch_size=4"):
        cmd += ["--override", item]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["threads"] == 1 and data["settings"]["n_embd"] == 32
    # the config's targets (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) in both blocks; lm_head not targeted
    assert len(data["targeted"]) == 8 and "lm_head" not in data["targeted"] and data["skipped_targets"] == []
    fc = data["layers"]["h.0.mlp.c_fc"]
    assert fc["targeted"] and fc["shape"] == [128, 32] and fc["input"] == [4, 32, 32]
    assert fc["r=0.25"]["rank"] == 8 and fc["r=0.5"]["rank"] == 16
    assert not data["layers"]["lm_head"]["targeted"]
    targeted = sum(r["dense_s"] for r in data["layers"].values() if r["targeted"])
    assert data["targeted_dense_s"] == pytest.approx(targeted) and targeted > 0
    assert data["share"] == pytest.approx(min(1.0, targeted / data["step"]["step_s"]))
    assert 0 < data["share"] <= 1 and data["amdahl_bound_free_layers"] == pytest.approx(1 / (1 - data["share"]))
    step = data["step"]
    assert step["forward_s"] > 0 and step["backward_s"] > 0 and step["optimizer_s"] > 0
    for key in ("r=0.25", "r=0.5"):
        row = data["ratios"][key]
        assert row["params"] < data["params"]
        assert row["layer_speedup"] == pytest.approx(targeted / row["layers_factorized_s"])
        share = data["share"]
        assert row["amdahl_step_speedup"] == pytest.approx(1 / (1 - share + share / row["layer_speedup"]))
        assert row["measured_step_speedup"] == pytest.approx(step["step_s"] / row["step"]["step_s"])
    assert data["ratios"]["r=0.25"]["params"] < data["ratios"]["r=0.5"]["params"]
    assert "Amdahl" in proc.stdout and "| 0.25 |" in proc.stdout


@pytest.mark.unit
def test_bench_step_share_compiles_both_sides(tmp_path: Path) -> None:
    """--compile times a compiled copy of the dense and of the factorized model; its ratios are those steps'."""
    out = tmp_path / "share.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_step_share.py"), "--iters", "2", "--warmup", "1",
           "--rank-ratio", "0.5", "--compile", "--json", str(out)]
    for item in ("run.n_layer=1", "run.n_embd=32", "run.n_head=2", "run.block_size=16", "run.batch_size=2"):
        cmd += ["--override", item]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    compiled = data["compiled"]
    assert sorted(compiled) == ["dense", "r=0.5"]
    dense, fact = compiled["dense"]["step"]["step_s"], compiled["r=0.5"]["step"]["step_s"]
    assert compiled["r=0.5"]["speedup_vs_compiled_dense"] == pytest.approx(dense / fact)
    assert compiled["r=0.5"]["speedup_vs_eager_dense"] == pytest.approx(data["step"]["step_s"] / fact)
    # the first step compiles forward and backward: it takes longer than a compiled step
    assert all(row["compile_s"] > row["step"]["step_s"] > 0 for row in compiled.values())
    assert "torch.compile" in proc.stdout and "| r=0.5 |" in proc.stdout


@pytest.mark.unit
def test_rank_search_repeatability_arithmetic() -> None:
    from bench_rank_search import plan_from_switch_event, summarize

    event = {"event": "switch", "timing": {
        "a": {"candidates": [{"rank": 105}, {"rank": 88}, {"rank": 80}, {"rank": 47}]},  # searched down to 47
        "b": {"candidates": [{"rank": 49}]}}}  # fast enough at its planned rank: no floor recorded
    assert plan_from_switch_event(event) == ({"a": 105, "b": 49}, {"a": 47})
    searches = [{"seconds": 1.0, "ranks": {"a": 88, "b": 49}}, {"seconds": 2.0, "ranks": {"a": 80, "b": 49}},
                {"seconds": 1.5, "ranks": {"b": 49}}, {"seconds": 1.2, "ranks": {"a": 88, "b": 49}}]
    out = summarize(searches, ["a", "b"])
    assert out["distinct_plans"] == 3 and out["total_rank"] == [137, 129, 49, 137]
    assert out["varied"] == {"a": [0, 80, 88]} and out["seconds"] == [1.0, 2.0, 1.5, 1.2]


@pytest.mark.unit
def test_bench_speed_table_smallest(tmp_path: Path) -> None:
    """The tool's table on the tiny GPT: one entry per distinct targeted shape (its MLP: 32->128 and 128->32 at the
    config's per-rank batch), every 8th rank below full rank and rank 1, readable by the switch."""
    import torch
    from bench_speed_table import largest_rank_at
    from torch import nn

    from dist_lowrank.profiling import InputShape
    from dist_lowrank.speed_table import SpeedTable, shape_key

    assert largest_rank_at({"dense_s": 1.0, "ranks": {8: 0.4, 16: 0.5, 24: 0.9}}, 2.0) == 16
    assert largest_rank_at({"dense_s": 1.0, "ranks": {8: 0.6}}, 2.0) is None
    out = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_speed_table.py"), "--config",
                           str(ROOT / "tests" / "e2e" / "tiny_gpt.yaml"), "--out", str(out), "--passes", "1",
                           "--trials", "1", "--processes", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = SpeedTable.load(out)
    cpu = torch.device("cpu")
    keys = {shape_key(nn.Linear(32, 128), InputShape((4, 32, 32)), cpu),
            shape_key(nn.Linear(128, 32), InputShape((4, 32, 128)), cpu)}
    assert set(table.entries) == keys
    assert all(sorted(e["ranks"]) == [1, 8, 16, 24] for e in table.entries.values())
    assert table.meta["measurements"] == 1 and table.meta["processes"] == 1
