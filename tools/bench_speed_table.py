"""Measure the layer-time table that `lowrank.switch.speed_table` reads at the switch (dist_lowrank/speed_table.py).

The config's model is built and its targeted layers' input shapes recorded on one real batch, as in bench_rank_search;
then every distinct layer shape is timed dense and at ranks every --step apart (`measure_speed_table`, --passes each,
fastest pass) --trials times in each of --processes processes at once (one thread each: the ranks of a run contend
for the machine the same way), and the median of those timings is written. Printed per shape: the largest measured
rank that is --bar times faster than dense in the median table, and its range over the single measurements (how
much a switch that times live would move).

    python tools/bench_speed_table.py --out configs/gpt_shakespeare_zero2.speed_table.json \\
        [--config configs/gpt_shakespeare_zero2.yaml] [--passes 5] [--trials 3] [--processes 2] [--bar 2.0]

With --ranks (a comma-separated list) only those ranks are timed and each one's speed-up over dense is printed,
e.g. aligned against unaligned ranks (what `lowrank.switch.rank_multiple` is for):

    python tools/bench_speed_table.py --out /tmp/aligned.json --ranks 39,40,41,47,48,49,55,56,57,63,64,65,79,80,81
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ROOT, input_shapes, machine, task_and_model  # noqa: E402


def largest_rank_at(entry: dict, bar: float) -> Optional[int]:
    """The largest measured rank whose time is `bar` times faster than dense (None: none is)."""
    fast = [r for r, t in entry["ranks"].items() if t > 0 and entry["dense_s"] / t >= bar]
    return max(fast) if fast else None


def _measure(job: tuple[Path, list[str], int, int, int, Optional[list[int]]]) -> list:
    """One process: build the model, record the shapes, measure the table `trials` times (entries only)."""
    config, overrides, passes, trials, step, ranks = job
    import torch

    torch.set_num_threads(1)
    from dist_lowrank.speed_table import measure_speed_table
    from dist_lowrank.targeting import select_targets

    run, lowrank, task, model = task_and_model(config, overrides)
    targets = select_targets(model, lowrank.target_modules, lowrank.exclude_modules)
    shapes = input_shapes(run, task, model, list(targets))
    return [measure_speed_table(targets, shapes, passes, torch.device("cpu"), step=step, seed=lowrank.seed,
                                ranks=ranks).entries
            for _ in range(trials)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "gpt_shakespeare_zero2.yaml")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--passes", type=int, default=5, help="passes per stand-in per measurement (fastest counts)")
    parser.add_argument("--trials", type=int, default=3, help="measurements per process")
    parser.add_argument("--processes", type=int, default=2, help="processes measuring at once (as ranks do)")
    parser.add_argument("--step", type=int, default=8, help="ranks measured: 1 and every STEP below full rank")
    parser.add_argument("--bar", type=float, default=2.0, help="speed-up to report the largest rank at")
    parser.add_argument("--ranks", type=lambda text: [int(r) for r in text.split(",")], default=None,
                        help="time only these ranks (comma-separated) and print each one's speed-up")
    args = parser.parse_args()
    if min(args.passes, args.trials, args.processes, args.step) < 1:
        raise SystemExit("bench_speed_table: --passes, --trials, --processes and --step must be >= 1")
    from dist_lowrank.speed_table import SpeedTable

    job = (args.config, args.override, args.passes, args.trials, args.step, args.ranks)
    with mp.get_context("spawn").Pool(args.processes) as pool:
        single = [SpeedTable(e) for result in pool.map(_measure, [job] * args.processes) for e in result]
    config = Path(args.config).resolve()
    meta = {"machine": machine(), "date": datetime.date.today().isoformat(),
            "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
            "overrides": args.override, "passes": args.passes, "trials": args.trials,
            "processes": args.processes, "measurements": len(single), "statistic": "median"}
    table = SpeedTable.median(single, meta)
    table.save(args.out)
    print(f"{args.out}: {len(table.entries)} shapes, the median of {len(single)} measurements "
          f"({args.processes} processes at once, {args.passes} passes each)")
    for key, entry in table.entries.items():
        each = [largest_rank_at(t.entries[key], args.bar) for t in single]
        known = [r for r in each if r is not None]
        spread = f"{min(known)}–{max(known)}" if known else "none"
        print(f"  {key}: dense {entry['dense_s'] * 1e3:.2f} ms; largest rank {args.bar}x faster: "
              f"{largest_rank_at(entry, args.bar)} (single measurements: {spread}, {len(each) - len(known)} none)")
        if args.ranks:
            print("    speed-up over dense: " + " ".join(f"{r}: {entry['dense_s'] / t:.2f}x"
                                                      for r, t in sorted(entry["ranks"].items())))


if __name__ == "__main__":
    main()
