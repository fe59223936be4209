"""Run a function on N real gloo ranks (separate processes) on this machine, with a timeout.

Every distributed test compares what the ranks return with a single-process reference computed in
the same test; this module only starts the processes and brings their results (or errors) back.
"""
from __future__ import annotations

import os
import pickle
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nobody listens on right now (never a hard-coded port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world: int, port: int, env: dict, queue, args: tuple) -> None:
    os.environ.update(env)
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
         "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}
    )
    import torch
    import torch.distributed as dist

    from dist_lowrank.device import before_process_group, end_process_group

    torch.set_num_threads(1)
    try:
        if env.get("DIST_HARNESS_NO_INIT") != "1":
            # gloo unless the caller asks for another backend (the gpu tier: DIST_LOWRANK_DIST_BACKEND=nccl);
            # this rank's GPU is bound from LOCAL_RANK before the group exists
            before_process_group()
            dist.init_process_group(env.get("DIST_LOWRANK_DIST_BACKEND", "gloo"), rank=rank, world_size=world)
        result = fn(rank, world, *args)
        # Plain pickle (copies tensor data): torch's shared-memory handles die with the worker.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException as exc:  # noqa: BLE001 - report every failure, named, to the parent
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            try:
                end_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_ranks(fn: Callable, world: int = 2, timeout: float = 120.0, args: tuple = (), env: dict | None = None,
              expect_errors: bool = False) -> list[Any]:
    """Run `fn(rank, world, *args)` on `world` processes; return results ordered by rank.

    `fn` must be importable (module level). With expect_errors=True, errors are returned as
    ("error", message) instead of raising, so a test can check that every rank failed by name.
    A rank that does not finish within `timeout` is killed and reported as a hang.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    base_env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    base_env.update(env or {})
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, base_env, queue, args)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    while len(results) < world and time.monotonic() < deadline:
        try:
            rank, status, payload = queue.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            results[rank] = (status, payload)
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()) if len(results) == world else 1)
        if p.is_alive():
            p.kill()
            p.join()
    missing = [r for r in range(world) if r not in results]
    if missing:
        raise TimeoutError(f"ranks {missing} did not finish within {timeout}s (hang or crash); got {results}")
    if expect_errors:
        return [results[r] if results[r][0] == "error" else pickle.loads(results[r][1]) for r in range(world)]
    errors = {r: payload for r, (status, payload) in results.items() if status == "error"}
    if errors:
        raise AssertionError("rank errors:\n" + "\n".join(f"[rank {r}] {m}" for r, m in sorted(errors.items())))
    return [pickle.loads(results[r][1]) for r in range(world)]
