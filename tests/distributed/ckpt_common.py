"""Shared by the checkpoint/fault tests: run the tiny GPT job through the real CLI or a launcher, read logs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "e2e" / "tiny_gpt.yaml"  # 12 steps, 2 ranks, ZeRO-2, switch forced at step 8
BIN = Path(sys.executable).parent
CKPT = ["run.log_every=1", "run.checkpoint_every=4", "run.keep_checkpoints=0"]
EXPORT = ["run.export_fp32=true"]
BACKENDS = {"ddp": ["run.backend=ddp"], "fsdp2": ["run.backend=fsdp2"], "zero2": ["run.zero_stage=2"],
            "zero3": ["run.zero_stage=3"]}


def clean_env(extra: Optional[dict] = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT") and not k.startswith("DIST_LOWRANK")}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra or {})})
    return env


def overrides_args(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--override", o)]


def cli(out: Path, overrides: list[str], env: Optional[dict] = None, check: bool = True,
        launcher: Optional[list[str]] = None, config: Path = CONFIG) -> subprocess.CompletedProcess:
    """`dist-lowrank train tiny_gpt.yaml` (or `config`; it spawns its ranks) or `<launcher> launch/train.py ...`."""
    head = launcher + ["launch/train.py"] if launcher else [str(BIN / "dist-lowrank"), "train"]
    proc = subprocess.run(head + [str(config)] + overrides_args(CKPT + [f"run.out_dir={out}"] + overrides),
                          cwd=ROOT, env=clean_env(env), capture_output=True, text=True, timeout=400)
    if check:
        assert proc.returncode == 0, f"run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def losses(out: Path) -> dict[int, float]:
    events = map(json.loads, (Path(out) / "events.jsonl").read_text().splitlines())
    return {e["step"]: e["loss"] for e in events if e["event"] == "train"}


def summary(out: Path) -> dict:
    return json.loads((Path(out) / "summary.json").read_text())


def exported(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(out) / "model_fp32.pt", weights_only=True)


def checkpoint(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step_{step:06d}"
