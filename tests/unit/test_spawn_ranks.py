"""The CLI's own rank launcher (train/launch_local._spawn_ranks) must not cut off a rank's named error.

Most failures are raised on every rank, a little apart (a bad checkpoint is found by each rank once its
own share has loaded). CI saw a ZeRO-3 resume where rank 1 was stopped as soon as rank 0 had failed, so
only rank 0's CheckpointError reached stderr. The ranks here are plain processes, so the timing is set by
the test: rank 0 fails at once, rank 1 a second later, or never."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _fails_apart(rank: int, world: int, delay_s: float) -> None:
    """Rank 0 fails at once, the others `delay_s` later, each with its own line (exit code 2, like _worker)."""
    time.sleep(rank * delay_s)
    sys.stderr.write(f"[rank {rank}] failed\n")
    sys.stderr.flush()
    os._exit(2)


def _rank0_fails_rank1_hangs(rank: int, world: int) -> None:
    if rank == 0:
        os._exit(2)
    time.sleep(600)


_LAUNCH = """
import sys, time
from dist_lowrank.train.launch_local import _spawn_ranks
from tests.unit import test_spawn_ranks as targets
target, args = {"apart": (targets._fails_apart, (1.0,)), "hang": (targets._rank0_fails_rank1_hangs, ())}[sys.argv[1]]
start = time.monotonic()
try:
    _spawn_ranks(2, args, target=target, grace_s=float(sys.argv[2]))
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")
print(f"ended after {time.monotonic() - start:.1f} s")
"""


def _launch(case: str, grace_s: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", _LAUNCH, case, str(grace_s)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_a_rank_failing_a_second_after_its_peer_still_prints_its_error() -> None:
    proc = _launch("apart", 10.0)
    assert proc.stderr.splitlines() == ["[rank 0] failed", "[rank 1] failed"], proc.stderr
    assert "DistLowRankError: rank 0 exited with code 2 (its error is above)" in proc.stdout, proc.stdout
    stopped_at_once = _launch("apart", 0.0)  # control: what the launcher did before the grace
    assert stopped_at_once.stderr.splitlines() == ["[rank 0] failed"], stopped_at_once.stderr


def test_a_rank_that_never_ends_is_stopped_after_the_grace() -> None:
    proc = _launch("hang", 1.0)
    assert "DistLowRankError: rank 0 exited with code 2" in proc.stdout, proc.stdout + proc.stderr
    ended = float(proc.stdout.split("ended after ")[1].split()[0])
    assert 1.0 <= ended < 30.0, proc.stdout
