"""The switch's memory measurement (backends.ds_memory.RssPeak) against an allocation of known size."""
from __future__ import annotations

import time

import pytest
import torch

from dist_lowrank.backends.ds_memory import RssPeak

pytestmark = pytest.mark.unit


def test_the_peak_sees_a_transient_allocation_that_is_gone_at_exit():
    """256 MiB touched and freed inside the block: the peak rise is about 256 MiB although RSS is back at exit;
    a block that allocates nothing rises by (almost) nothing."""
    with RssPeak() as idle:
        time.sleep(0.05)
    with RssPeak() as busy:
        block = torch.ones(64 * 1024 * 1024, dtype=torch.float32)  # 256 MiB, every page written
        time.sleep(0.05)  # the sampler runs every 2 ms
        del block
        time.sleep(0.05)
    assert 240 <= busy.delta_mb <= 300, busy.delta_mb
    assert idle.delta_mb < 16, idle.delta_mb
