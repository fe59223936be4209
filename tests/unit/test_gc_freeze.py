"""startup_objects_frozen: the switch's gc pass skips startup objects but still frees new cycles."""
from __future__ import annotations

import gc
import weakref

from dist_lowrank.gc_freeze import startup_objects_frozen


class _Node:
    def __init__(self) -> None:
        self.other: object = self


def test_cycles_built_inside_the_block_are_collected_and_the_block_unfreezes() -> None:
    before = _Node()
    with startup_objects_frozen("local") as frozen:
        assert frozen > 1000 and gc.get_freeze_count() > 1000  # refcounting may free a few
        inside = _Node()  # a reference cycle like an old engine's hooks
        alive = weakref.ref(inside)
        del inside
        gc.collect()
        assert alive() is None, "a cycle made after the freeze must still be collected"
    assert gc.get_freeze_count() == 0
    frozen_then = weakref.ref(before)
    del before
    gc.collect()
    assert frozen_then() is None, "after the block, startup cycles are collectable again"
