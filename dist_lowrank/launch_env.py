"""Where am I in the job? One place that reads every launcher's environment.

Order: torchrun / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) →
SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR = first host of
`scontrol show hostnames $SLURM_JOB_NODELIST`) → MPI (OMPI_COMM_WORLD_* or PMI_*, else mpi4py; the
address is rank 0's hostname sent over MPI — never DeepSpeed's `hostname -I` guess). `apply` writes the
torch.distributed variables so `init_process_group("env://")` works the same under every launcher.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

from dist_lowrank.errors import ConfigError

DEFAULT_PORT = 29511


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torch", "slurm" or "mpi"


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(f"environment variable {key}: got {env[key]!r}; allowed: an integer") from None


def slurm_master_addr(nodelist: str) -> str:
    """First host of a SLURM node list, expanded by `scontrol show hostnames` (the real tool)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                             text=True, timeout=30).stdout.split()
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: `scontrol show hostnames` failed ({exc})") from None
    if not out:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: `scontrol show hostnames` returned no host")
    return out[0]


def _mpi_rank0_address(rank: int) -> tuple[str, int]:
    """Rank 0's hostname and a free port on it, sent to every rank over MPI (mpi4py)."""
    from mpi4py import MPI

    payload = None
    if rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            payload = (os.environ.get("MASTER_ADDR") or socket.gethostname(), s.getsockname()[1])
    return MPI.COMM_WORLD.bcast(payload, root=0)


def discover(env: Optional[Mapping[str, str]] = None) -> Optional[DistEnv]:
    """The job this process belongs to, or None when no launcher started it."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(_int(env, "RANK"), _int(env, "WORLD_SIZE"), int(env.get("LOCAL_RANK", "0")),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", DEFAULT_PORT)), "torch")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = int(env.get("SLURM_JOB_ID", "0"))
        addr = env.get("MASTER_ADDR") or slurm_master_addr(env["SLURM_JOB_NODELIST"])
        port = int(env.get("MASTER_PORT", 10000 + job % 50000))
        return DistEnv(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), int(env.get("SLURM_LOCALID", "0")),
                       addr, port, "slurm")
    for rank_key, size_key, local_key in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                           "OMPI_COMM_WORLD_LOCAL_RANK"), ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")):
        if rank_key in env and size_key in env:
            rank = _int(env, rank_key)
            if "MASTER_ADDR" in env and "MASTER_PORT" in env:
                addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
            else:
                addr, port = _mpi_rank0_address(rank)
            return DistEnv(rank, _int(env, size_key), int(env.get(local_key, "0")), addr, port, "mpi")
    return None


def apply(job: DistEnv) -> None:
    """Export the variables torch.distributed's env:// rendezvous (and DeepSpeed) read."""
    os.environ.update({"RANK": str(job.rank), "WORLD_SIZE": str(job.world_size), "LOCAL_RANK": str(job.local_rank),
                       "MASTER_ADDR": job.master_addr, "MASTER_PORT": str(job.master_port)})
