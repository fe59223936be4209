"""Join the distributed job we are in, or start the local worker processes ourselves.

Inside torchrun, the deepspeed launcher, SLURM or mpirun (see launch_env) every process joins the job.
Otherwise run.world_size processes are started here (gloo on CPU, nccl on GPUs), or, for
world_size 1, the job runs in this process without a process group. The parent that starts local ranks
never imports torch (3 s here, before any rank could start): torch is imported where it is used.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sys
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

from dist_lowrank.config import LowRankConfig
from dist_lowrank.errors import DistLowRankError
from dist_lowrank.launch_env import apply, discover
from dist_lowrank.train.run_config import RunConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_launched_job() -> bool:
    """Started by torchrun / deepspeed / SLURM / mpirun? Then export the torch.distributed variables."""
    job = discover()
    if job is None:
        return False
    apply(job)
    return True


def _worker(rank: int, world: int, port: int, run: RunConfig, lowrank: LowRankConfig) -> None:
    """One spawned rank. A named error is printed as one line with the rank and ends the process with
    exit code 2 (the parent reports it in one line too); anything else keeps its traceback."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        _train_in_group(run, lowrank)
    except DistLowRankError as exc:
        sys.stderr.write(f"dist-lowrank: error: [rank {rank}] {type(exc).__name__}: {exc}\n")  # one write: no
        end_rank_process(2)                                                                   # interleaving
    end_rank_process(0)


def end_rank_process(code: int) -> NoReturn:
    """End a rank's process once its group is destroyed and its files are closed, without interpreter
    teardown. torch and DeepSpeed keep process groups alive past destroy_process_group in module-level
    state (DTensor's sharding caches hold DeviceMeshes, whose registry holds the group; DeepSpeed's groups
    module holds its groups); their gloo threads are then torn down during teardown, and a rank whose peer
    is still closing aborts with "terminate called without an active exception" (SIGABRT; CI saw it on
    FSDP2 runs). Streams and logging are flushed first, so nothing written is lost, and MPI is finalized
    where mpi4py started it (rank discovery under mpirun): prterun counts a rank that ends without
    MPI_Finalize as an abnormal termination and fails the job."""
    import logging

    logging.shutdown()
    _finalize_mpi()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _finalize_mpi() -> None:
    """MPI_Finalize, which mpi4py would run at interpreter exit, for a process that ends with os._exit."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


def init_process_group() -> None:
    """env:// rendezvous with the backend for this device. Under torchelastic every restart attempt gets
    its own key prefix in the store: torch 2.13's torchrun hands the restarted workers a store that still
    holds the failed attempt's keys, and gloo then dials the dead workers' addresses (connectFullMesh:
    connection refused) instead of meeting the new ones."""
    import torch.distributed as dist

    from dist_lowrank.device import before_process_group, default_dist_backend

    before_process_group()  # cuda:LOCAL_RANK bound (NCCL object collectives use it), torch._dynamo imported
    backend = default_dist_backend()
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend)
        return
    store, rank, world = next(dist.rendezvous("env://"))
    dist.init_process_group(backend, store=dist.PrefixStore(f"dist_lowrank/attempt_{attempt}", store), rank=rank,
                            world_size=world)


def _train_in_group(run: RunConfig, lowrank: LowRankConfig) -> dict[str, Any]:
    from dist_lowrank.device import end_process_group
    from dist_lowrank.train.loop import train

    init_process_group()
    try:
        return train(run, lowrank)
    finally:
        end_process_group()


def run_training(run: RunConfig, lowrank: LowRankConfig) -> Optional[dict[str, Any]]:
    """Run the job; returns the summary where this process can see it (rank 0 or single process)."""
    if _in_launched_job():
        summary = _train_in_group(run, lowrank)
        return summary if int(os.environ["RANK"]) == 0 else None
    if run.world_size == 1 and run.backend == "local":
        from dist_lowrank.train.loop import train

        return train(run, lowrank)
    _spawn_ranks(run.world_size, (_free_port(), run, lowrank))
    summary_path = Path(run.out_dir) / "summary.json"
    return json.loads(summary_path.read_text()) if summary_path.exists() else None


FAILURE_GRACE_S = 10.0
"""How long the other ranks get, after the first one fails, to end by themselves. Most failures are
raised on every rank (a bad checkpoint, a config check, Coordinator.shared_failure), a little apart: a rank
stopped at once would lose its own named error line (CI saw a ZeRO-3 rank still loading when its peer had
already failed). A rank still running after the grace is stopped."""


def _spawn_ranks(world: int, args: tuple, target: Callable[..., None] = _worker,
                 grace_s: float = FAILURE_GRACE_S) -> None:
    """Start `world` fresh interpreters (spawn: no inherited threads or device state) running `target`;
    after the first rank that exits non-zero the others get `grace_s` to end by themselves and are then
    stopped, and that first rank is reported in one line, as torch's mp.spawn does, without importing torch
    in this parent."""
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=target, args=(rank, world) + args, name=f"rank{rank}") for rank in range(world)]
    for proc in procs:
        proc.start()
    failed: Optional[tuple[int, int]] = None
    try:
        running = list(procs)
        deadline: Optional[float] = None
        while running:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                break
            wait([p.sentinel for p in running], timeout=timeout)
            for proc in [p for p in running if p.exitcode is not None]:
                running.remove(proc)
                if proc.exitcode != 0 and failed is None:
                    failed = (procs.index(proc), proc.exitcode)
                    deadline = time.monotonic() + grace_s
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join()
    if failed is not None:
        raise DistLowRankError(f"rank {failed[0]} exited with code {failed[1]} (its error is above)")
