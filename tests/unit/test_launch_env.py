"""Launcher environment discovery: torchrun/deepspeed, SLURM (simulated allocation, stand-in scontrol), MPI."""
from __future__ import annotations

import os
import stat

import pytest

from dist_lowrank.errors import ConfigError
from dist_lowrank.launch_env import discover

pytestmark = pytest.mark.unit


def test_torchrun_and_deepspeed_variables():
    job = discover({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "1234"})
    assert (job.rank, job.world_size, job.local_rank, job.master_addr, job.master_port, job.source) == \
        (3, 8, 1, "node0", 1234, "torch")
    assert discover({}) is None
    with pytest.raises(ConfigError, match="RANK: got 'x'"):
        discover({"RANK": "x", "WORLD_SIZE": "2"})


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """A stand-in `scontrol` that expands node lists like the real one (node[01-03] → node01 node02 node03)."""
    script = tmp_path / "scontrol"
    script.write_text(
        "#!/usr/bin/env python3\n"
        "import re, sys\n"
        "assert sys.argv[1:3] == ['show', 'hostnames'], sys.argv\n"
        "for part in re.findall(r'[^,\\[]+(?:\\[[^\\]]*\\])?', sys.argv[3]):\n"
        "    m = re.match(r'(.*)\\[(.*)\\]', part)\n"
        "    if not m:\n        print(part); continue\n"
        "    for rng in m.group(2).split(','):\n"
        "        lo, _, hi = rng.partition('-'); hi = hi or lo\n"
        "        for i in range(int(lo), int(hi) + 1): print(f'{m.group(1)}{i:0{len(lo)}d}')\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_slurm_allocation(fake_scontrol):
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[07-10]"}
    job = discover(env)
    assert (job.rank, job.world_size, job.local_rank, job.master_addr, job.master_port, job.source) == \
        (5, 8, 1, "gpu07", 10000 + 4242 % 50000, "slurm")


def test_slurm_without_scontrol_is_a_named_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="scontrol show hostnames"):
        discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]"})


def test_openmpi_variables_with_explicit_address():
    job = discover({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"})
    assert (job.rank, job.world_size, job.local_rank, job.master_addr, job.source) == (1, 2, 1, "127.0.0.1", "mpi")
