"""How repeatable the switch's layer-timing rank search is: the plan of a real run's switch, searched again.

The plan (each layer's planned rank, and its quality floor where the run searched below it) comes from a run's
`switch` event; the layers and their activation shapes from the config's model on one batch. The search
(`keep_dense_where_not_faster`, the run's `min_speedup`, `profile_iters` unless --iters) runs --trials times in
each of --processes processes at once (one thread each, as the ranks run: they contend for the machine the same
way), without a process group, so every search decides alone. Printed: each search's seconds and total rank, how
many distinct plans came out, and each layer that did not always get the same rank.
A layer the run factorized at its planned rank has no recorded floor; here it is kept dense if it misses the bar.

    python tools/bench_rank_search.py RUN_DIR [--config configs/gpt_shakespeare_zero2.yaml] [--trials 4] [--iters 5]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ROOT, machine, input_shapes, read_events, task_and_model  # noqa: E402


def plan_from_switch_event(event: dict) -> tuple[dict[str, int], dict[str, int]]:
    """(planned ranks, floors) of a switch event: the first candidate timed is the planned rank; a layer searched
    below it has its floor as the last candidate (search_ranks always ends at the floor)."""
    planned, floors = {}, {}
    for name, row in event.get("timing", {}).items():
        candidates = row["candidates"]
        planned[name] = int(candidates[0]["rank"])
        if len(candidates) > 1:
            floors[name] = int(candidates[-1]["rank"])
    return planned, floors


def _search(job: tuple[Path, list[str], dict, dict, int, float, int]) -> list[dict[str, Any]]:
    """One process: build the model, record shapes, search `trials` times; each search's seconds and ranks."""
    config, overrides, planned, floors, iters, min_speedup, trials = job
    import torch

    torch.set_num_threads(1)
    from dist_lowrank.plan import Plan
    from dist_lowrank.profiling import keep_dense_where_not_faster

    run, _lowrank, task, model = task_and_model(config, overrides)
    modules = {n: m for n, m in model.named_modules() if n in planned}
    shapes = input_shapes(run, task, model, list(modules))
    plan = Plan("switch", 0, planned, floors=floors)
    out = []
    for _ in range(trials):
        start = time.perf_counter()
        kept, _table = keep_dense_where_not_faster(plan, modules, shapes, iters, min_speedup, torch.device("cpu"),
                                                   rank_search=True)
        out.append({"seconds": time.perf_counter() - start, "ranks": kept.ranks})
    return out


def summarize(searches: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Distinct plans, total rank per search (a dense layer counts 0), and the layers whose rank varied."""
    plans = {json.dumps(s["ranks"], sort_keys=True) for s in searches}
    varied = {n: sorted({s["ranks"].get(n) or 0 for s in searches}) for n in names}
    return {"searches": len(searches), "distinct_plans": len(plans),
            "total_rank": [sum(s["ranks"].values()) for s in searches],
            "seconds": [s["seconds"] for s in searches],
            "varied": {n: v for n, v in varied.items() if len(v) > 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "gpt_shakespeare_zero2.yaml")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--trials", type=int, default=4, help="searches per process")
    parser.add_argument("--processes", type=int, default=2, help="processes searching at once (as ranks do)")
    parser.add_argument("--iters", type=int, default=None, help="passes per candidate (default: the run's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    switches = read_events(args.run_dir, "switch")
    if not switches or not switches[0].get("timing"):
        raise SystemExit(f"bench_rank_search: {args.run_dir}/events.jsonl has no switch event with a timing table")
    from dist_lowrank.train.config_file import load_train_config

    _, lowrank = load_train_config(args.config, args.override)
    iters: Optional[int] = args.iters or lowrank.switch.profile_iters
    if args.trials < 1 or args.processes < 1 or iters < 1:
        raise SystemExit("bench_rank_search: --trials, --processes and --iters must be >= 1")
    planned, floors = plan_from_switch_event(switches[0])
    job = (args.config, args.override, planned, floors, iters, lowrank.switch.min_speedup, args.trials)
    with mp.get_context("spawn").Pool(args.processes) as pool:
        searches = [s for result in pool.map(_search, [job] * args.processes) for s in result]
    data = {"machine": machine(), "run_ranks": switches[0].get("ranks"), "iters": iters,
            "min_speedup": lowrank.switch.min_speedup, "planned": planned, "floors": floors,
            **summarize(searches, sorted(planned))}
    print(f"{data['searches']} searches ({args.processes} processes at once, {iters} passes per candidate, bar "
          f"{data['min_speedup']}x): {data['distinct_plans']} distinct plans; total rank "
          f"{min(data['total_rank'])}–{max(data['total_rank'])}; {min(data['seconds']):.1f}–"
          f"{max(data['seconds']):.1f} s per search")
    for name, ranks in data["varied"].items():
        print(f"  {name}: {ranks}")
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
