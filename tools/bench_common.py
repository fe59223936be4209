"""Shared by the benchmarks: the machine they ran on, and one `dist-lowrank train` run in a subprocess."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

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
