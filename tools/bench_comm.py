"""Communication per step, full rank vs after the switch, measured vs analytic, per backend, in one invocation.

Runs the demo GPT job (`dist-lowrank train`, 2 gloo ranks) on DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 with the
switch forced early (so every run has both phases) and reads each run's report: bytes this rank sent per
training step by our counter (torch.distributed wrappers + DDP comm hook) beside the analytic ring model
(telemetry/analytic.py), and the full/low ratio. By default every targeted layer is factorized at the
strategy's rank (`--keep-dense-by-timing` keeps the demo's measured keep-dense decisions instead).

    python tools/bench_comm.py [--backends ddp,fsdp2,zero1,zero2,zero3] [--rank-rule scaled|raw] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ROOT, train_run  # noqa: E402
ENGINES = {"ddp": ["run.backend=ddp"], "fsdp2": ["run.backend=fsdp2"], "zero1": ["run.zero_stage=1"],
           "zero2": ["run.zero_stage=2"], "zero3": ["run.zero_stage=3"]}


def measure(config: Path, engine: str, extra: list[str], out: Path) -> dict:
    overrides = ENGINES[engine] + ["run.steps=80", "run.log_every=10", "run.eval_every=0", "run.eval_samples=16",
                                   "lowrank.monitor.cadence_steps=10", "lowrank.cuttlefish.min_switch_step=0",
                                   "lowrank.cuttlefish.max_switch_step=40"] + extra
    _, report = train_run(config, overrides, out, f"bench_comm: {engine}")
    phases = report["phases"]
    full, low = phases["full"], phases["low"]
    return {"full_measured": full["comm_measured_total"], "full_analytic": full["comm_analytic_total"],
            "low_measured": low["comm_measured_total"], "low_analytic": low["comm_analytic_total"],
            "params_full": full["params"], "params_low": low["params"],
            "by_op_full": full["comm_bytes_per_step_measured"], "by_op_low": low["comm_bytes_per_step_measured"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "gpt_shakespeare_zero2.yaml")
    parser.add_argument("--backends", default=",".join(ENGINES))
    parser.add_argument("--rank-rule", choices=("scaled", "raw"), default=None, help="default: the config's")
    parser.add_argument("--keep-dense-by-timing", action="store_true")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every run after the tool's own (repeatable)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    engines = args.backends.split(",")
    if any(e not in ENGINES for e in engines):
        raise SystemExit(f"bench_comm: --backends: allowed {', '.join(ENGINES)}")
    extra = [] if args.keep_dense_by_timing else ["lowrank.switch.profile_layers=false",
                                                  "lowrank.cuttlefish.search_above_saving=false"]  # needs profiling
    if args.rank_rule:
        extra.append(f"lowrank.cuttlefish.rank_rule={args.rank_rule}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in engines:
            results[engine] = measure(args.config, engine, extra + args.override, Path(tmp) / engine)
    print(f"config {args.config.name} {' '.join(extra + args.override)}; bytes each rank sends per training step\n")
    print("| backend | full measured | full analytic | diff | low measured | low analytic | diff | full/low "
          "| params full/low |")
    print("|---|---|---|---|---|---|---|---|---|")
    for engine, r in results.items():
        d_full = r["full_measured"] / r["full_analytic"] - 1
        d_low = r["low_measured"] / r["low_analytic"] - 1
        r.update({"diff_full": d_full, "diff_low": d_low, "full_over_low": r["full_measured"] / r["low_measured"]})
        print(f"| {engine} | {r['full_measured']:,.0f} | {r['full_analytic']:,.0f} | {100 * d_full:+.2f}% "
              f"| {r['low_measured']:,.0f} | {r['low_analytic']:,.0f} | {100 * d_low:+.2f}% "
              f"| {r['full_over_low']:.2f}x | {r['params_full'] / r['params_low']:.2f}x |")
    print("\ntargets: measured within 2% of analytic; full/low >= 3x on the demo model")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
