"""SLURM cannot run here: run the sbatch scripts' logic for real under a simulated allocation.

SLURM_* variables describe a 3-node job; stand-ins for `scontrol` (expands node lists like the real
one), `srun` (runs its command once per node with SLURM_PROCID/SLURM_NODEID set) and the launchers
(`torchrun`, `deepspeed`: record their command line and environment) are put first on PATH.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parents[2]

SCONTROL = r'''#!/usr/bin/env python3
import re, sys
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", sys.argv[3]):
    m = re.match(r"(.*)\[(.*)\]", part)
    if not m:
        print(part); continue
    for rng in m.group(2).split(","):
        lo, _, hi = rng.partition("-"); hi = hi or lo
        for i in range(int(lo), int(hi) + 1): print(f"{m.group(1)}{i:0{len(lo)}d}")
'''
SRUN = '''#!/bin/bash
# stand-in srun: one task per node, like --ntasks-per-node=1
while [[ "$1" == --* ]]; do shift; done
for ((node=0; node<SLURM_JOB_NUM_NODES; node++)); do
  SLURM_PROCID=$node SLURM_NODEID=$node SLURM_LOCALID=0 "$@"
done
'''
RECORD = '''#!/usr/bin/env python3
import json, os, sys
with open(os.environ["RECORD_FILE"], "a") as fh:
    fh.write(json.dumps({"cmd": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                         "node": os.environ.get("SLURM_NODEID"), "master": os.environ.get("MASTER_ADDR")}) + "\\n")
'''


@pytest.fixture
def cluster(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN), ("torchrun", RECORD), ("deepspeed", RECORD)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7731",
           "SLURM_JOB_NODELIST": "gpu[03-05]", "SLURM_JOB_NUM_NODES": "3", "GPUS_PER_NODE": "4",
           "RECORD_FILE": str(tmp_path / "calls.jsonl"), "HOSTFILE": str(tmp_path / "hostfile")}
    return tmp_path, env


def _calls(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def test_torchrun_per_node(cluster):
    tmp_path, env = cluster
    subprocess.run(["bash", "launch/slurm_torchrun.sbatch", "configs/gpt_shakespeare_zero2.yaml", "--override",
                    "run.steps=5"], cwd=ROOT, env=env, check=True, timeout=60)
    calls = _calls(tmp_path)
    assert [c["node"] for c in calls] == ["0", "1", "2"]  # one torchrun per node
    port = str(10000 + 7731 % 50000)
    for call in calls:
        argv = call["argv"]
        assert call["cmd"] == "torchrun" and call["master"] == "gpu03"
        assert argv[argv.index("--nnodes") + 1] == "3" and argv[argv.index("--nproc_per_node") + 1] == "4"
        assert argv[argv.index("--rdzv_endpoint") + 1] == f"gpu03:{port}"
        assert argv[-4:] == ["launch/train.py", "configs/gpt_shakespeare_zero2.yaml", "--override", "run.steps=5"]


def test_deepspeed_with_hostfile(cluster):
    tmp_path, env = cluster
    subprocess.run(["bash", "launch/slurm_deepspeed.sbatch", "configs/gpt_shakespeare_zero2.yaml"], cwd=ROOT,
                   env=env, check=True, timeout=60)
    assert (tmp_path / "hostfile").read_text().splitlines() == ["gpu03 slots=4", "gpu04 slots=4", "gpu05 slots=4"]
    (call,) = _calls(tmp_path)
    argv = call["argv"]
    assert call["cmd"] == "deepspeed"
    assert argv[argv.index("--hostfile") + 1] == str(tmp_path / "hostfile")
    assert argv[argv.index("--master_addr") + 1] == "gpu03"
    assert argv[argv.index("--master_port") + 1] == str(10000 + 7731 % 50000)


def test_ranks_seen_by_the_job_under_srun(cluster, monkeypatch):
    """What each srun task would see: the discovery gives rank, world and the first host as address."""
    from dist_lowrank.launch_env import discover

    tmp_path, env = cluster
    monkeypatch.setenv("PATH", env["PATH"])
    jobs = [discover({"SLURM_PROCID": str(r), "SLURM_NTASKS": "12", "SLURM_LOCALID": str(r % 4),
                      "SLURM_JOB_ID": "7731", "SLURM_JOB_NODELIST": "gpu[03-05]"}) for r in range(12)]
    assert [j.rank for j in jobs] == list(range(12)) and {j.world_size for j in jobs} == {12}
    assert {j.master_addr for j in jobs} == {"gpu03"} and [j.local_rank for j in jobs[:5]] == [0, 1, 2, 3, 0]
