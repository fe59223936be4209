"""Rank trajectory, reshards and growth-check bytes of an InRank run, from its events.jsonl.

    python tools/inrank_trajectory.py runs/inrank
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run_dir: str) -> None:
    path = Path(run_dir) / "events.jsonl"
    if not path.exists():
        sys.exit(f"{path}: not found (is {run_dir} a dist-lowrank run directory?)")
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    checks = [e for e in events if e["event"] == "spectrum"]
    grows = [e for e in events if e["event"] == "grow"]
    if not checks:
        sys.exit(f"{path}: no InRank growth checks recorded")
    names = sorted(checks[0]["ranks"])
    print(f"growth checks: {len(checks)}, bytes per check (all layers): {checks[-1]['gram_bytes']:,} "
          f"in {checks[-1]['gram_collectives']} all-reduce(s)")
    print(f"reshards (capacity growths): {sum(e['reshards'] for e in grows)}; growth events: {len(grows)}")
    print("| step | " + " | ".join(f"{n} rank / capacity" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    ranks = dict(checks[0]["ranks"])
    caps = dict(checks[0]["capacities"])
    print("| start | " + " | ".join(f"{ranks[n]} / {caps[n]}" for n in names) + " |")
    for e in grows:
        ranks.update(e["ranks"])
        caps.update(e["capacities"])
        print(f"| {e['step']} | " + " | ".join(f"{ranks[n]} / {caps[n]}" for n in names) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/inrank")
