"""End to end on the demo job: full rank vs Cuttlefish vs InRank at equal steps, same machine, one invocation.

Each variant is the real `dist-lowrank train` on the demo config (2 gloo ranks, DeepSpeed ZeRO-2, char GPT on
Shakespeare); only `lowrank.*` differs. Reported per variant (median of --repeats, min–max): wall time,
tokens/s in the last phase (after the switch; InRank: after its latest growth), final validation loss, parameters — and the
ratios against full rank, which is what a shared noisy machine can measure honestly.

    python tools/bench_end_to_end.py [--config configs/gpt_shakespeare_zero2.yaml] [--repeats 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ROOT, train_run  # noqa: E402
VARIANTS: dict[str, list[str]] = {
    "full_rank": ["lowrank.strategy=none"],
    "cuttlefish": [],
    "inrank": ["lowrank.strategy=inrank", "lowrank.inrank.init_rank=16", "lowrank.inrank.warmup=50",
               "lowrank.inrank.gap=50", "lowrank.inrank.buffer=8", "lowrank.inrank.w0_mode=none"],
}


def run_variant(config: Path, overrides: list[str], out: Path) -> dict:
    """One training run: wall time, last-phase throughput, final validation loss, parameters."""
    summary, report = train_run(config, overrides + ["run.eval_every=0"], out,
                                f"bench_end_to_end: {' '.join(overrides) or 'cuttlefish'}")
    # the last phase with a steady log window: after the switch / the latest growth
    after = [p for p in report["phases"].values() if p.get("tokens_per_sec") is not None][-1]
    return {"wall_s": summary["wall_seconds"], "tokens_per_s": after["tokens_per_sec"],
            "val_loss": summary["final_eval"].get("val_loss"), "params": summary["params_final"],
            "switch_step": summary["switch_step"]}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.4g} [{min(values):.4g}–{max(values):.4g}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "gpt_shakespeare_zero2.yaml")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every run after the tool's own (repeatable)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or args.repeats < 1:
        raise SystemExit(f"bench_end_to_end: --variants {unknown} unknown (allowed {list(VARIANTS)}) or --repeats < 1")
    results: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # interleaved, so load changes hit every variant alike
            for name in names:
                results[name].append(run_variant(args.config, VARIANTS[name] + args.override,
                                                 Path(tmp) / f"{name}{repeat}"))
    base = results.get("full_rank")
    print(f"config {args.config.name}, repeats {args.repeats} (median [min–max])\n")
    print("| variant | wall s | tokens/s after switch | val loss | params | speed-up (wall) | tokens/s ratio "
          "| val loss vs full |")
    print("|---|---|---|---|---|---|---|---|")
    table = {}
    for name, runs in results.items():
        row = {key: [r[key] for r in runs] for key in ("wall_s", "tokens_per_s", "val_loss", "params")}
        ratios = {}
        if base:
            ratios = {"speedup_wall": statistics.median(b["wall_s"] for b in base) / statistics.median(row["wall_s"]),
                      "tokens_ratio": statistics.median(row["tokens_per_s"]) /
                      statistics.median(b["tokens_per_s"] for b in base),
                      "val_loss_rel": statistics.median(row["val_loss"]) /
                      statistics.median(b["val_loss"] for b in base) - 1}
        table[name] = {"runs": runs, **ratios}
        print(f"| {name} | {spread(row['wall_s'])} | {spread(row['tokens_per_s'])} | {spread(row['val_loss'])} "
              f"| {int(statistics.median(row['params'])):,} | {ratios.get('speedup_wall', 1):.2f}x "
              f"| {ratios.get('tokens_ratio', 1):.2f}x | {100 * ratios.get('val_loss_rel', 0):+.2f}% |")
    print("\ntarget: >= 1.3x faster end to end with validation loss within 2% of full rank")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
