"""Fault injection for the reliability tests, at named points of the switch and the checkpoint save.

DIST_LOWRANK_FAULT="<point>[@<step>]:<action>:<rank>[:<seconds>]" arms one fault:
    point   gather (a rank's fetch of a full layer, after its collectives), factorize (a rank's SVD of its
            layer during a switch), switch (before the reshard barrier),
            rebuild (after the module surgery of a switch or growth, before the new optimizer / engine),
            transplant (new optimizer built, before the old optimizer state is installed in it),
            save (after this rank wrote its engine files, before the checkpoint is committed)
    action  raise (RuntimeError), kill (SIGKILL this process), sleep (for <seconds>)
DIST_LOWRANK_FAULT_ONCE=<file>: fire only while <file> does not exist, and create it when firing, so a job
restarted by its launcher (torchrun --max-restarts) runs clean the second time.
Unset (the normal case) every call is a dictionary lookup and nothing else.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from dist_lowrank.device import is_distributed


class InjectedFault(RuntimeError):
    """The failure a test asked for (never raised unless DIST_LOWRANK_FAULT is set)."""


def maybe_fault(point: str, step: Optional[int] = None) -> None:
    spec = os.environ.get("DIST_LOWRANK_FAULT")
    if not spec:
        return
    where, action, rank, *rest = spec.split(":")
    name, _, at_step = where.partition("@")
    me = dist.get_rank() if is_distributed() else 0
    if name != point or int(rank) != me or (at_step and step != int(at_step)):
        return
    once = os.environ.get("DIST_LOWRANK_FAULT_ONCE")
    if once:
        if Path(once).exists():
            return
        Path(once).write_text(spec)
    if action == "raise":
        raise InjectedFault(f"injected fault at {point} on rank {me}")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "sleep":
        time.sleep(float(rest[0]))
