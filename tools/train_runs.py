"""Shared by the end-to-end benchmarks: one `dist-lowrank train` run in a subprocess, its summary and report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
