"""Shared by the benchmarks: the machine they ran on, one `dist-lowrank train` run in a subprocess, its
events, and the median [min–max] the tools print."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]


def train_run(config: Path, overrides: list[str], out: Path, label: str) -> tuple[dict, dict]:
    """(summary.json, report.json) of the run; exits with the run's stderr tail named by `label` on failure."""
    cmd = [str(Path(sys.executable).parent / "dist-lowrank"), "train", str(config), "--override", f"run.out_dir={out}"]
    for item in overrides:
        cmd += ["--override", item]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text()), json.loads((out / "report.json").read_text())


def task_and_model(config: Path, overrides: list[str], device: Any = None) -> tuple:
    """(run, lowrank, task, model) of the config: the model seeded and built as `dist-lowrank train` does."""
    import torch

    from dist_lowrank.train.config_file import load_train_config
    from dist_lowrank.train.tasks import build_task

    run, lowrank = load_train_config(config, overrides)
    torch.manual_seed(run.seed)
    task = build_task(run)
    model = task.model_fn()
    return run, lowrank, task, model if device is None else model.to(device)


def input_shapes(run: Any, task: Any, model: Any, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The input shape of each module in `names`, recorded on one real batch of the task."""
    from dist_lowrank.profiling import record_input_shapes

    shapes: dict[str, tuple[int, ...]] = {}
    with record_input_shapes(model, list(names), shapes):
        task.loss_fn(model, next(task.batches(0, run.world_size)))
    return shapes


def read_events(out: Path, kind: Optional[str] = None) -> list[dict]:
    """The run's events.jsonl records (rank 0's log), only those of `kind` (e.g. "eval") when given."""
    path = Path(out) / "events.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("event") == kind]


def median_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    """The median, or None when a value is missing (a metric one run lacks is not silently dropped)."""
    if not values or any(v is None for v in values):
        return None
    return float(statistics.median(values))


def spread(values: Sequence[Optional[float]], digits: int = 4) -> str:
    """`median [min–max]` (just the value when all agree), or "n/a" when a value is missing."""
    if not values or any(v is None for v in values):
        return "n/a"
    med, lo, hi = statistics.median(values), min(values), max(values)
    if lo == hi:
        return f"{med:.{digits}g}"
    return f"{med:.{digits}g} [{lo:.{digits}g}–{hi:.{digits}g}]"


def machine() -> dict[str, Any]:
    """What the numbers came from: cores, platform, Python, torch and deepspeed versions."""
    from importlib import metadata

    import torch

    try:
        ds_version = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        ds_version = None
    return {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": ds_version}
