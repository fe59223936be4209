"""Keep the switch's garbage-collection pass short: freeze the objects that exist before the model.

A switch runs one full `gc.collect()` so that the old engine (reference cycles through hooks and
optimizer wrappers) is freed before the new one allocates. With torch + DeepSpeed imported a full
pass walks ~200–400k import-time objects (0.15–0.25 s here) that never become garbage. `gc.freeze()`
moves everything alive at that moment into a generation the collector skips, so the pass only walks
what was built afterwards (model, engine, optimizer). Frozen objects are still freed by reference
counting; only cyclic garbage among them would stay, which is why this runs *before* any model exists
(`dist-lowrank train` uses `startup_objects_frozen` around a run; library users may do the same) and why
the context manager unfreezes on exit: a process that trains several times frees the earlier runs' cycles.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


def freeze_startup_objects(backend: str) -> int:
    """Import `backend`'s engine library, collect once, then freeze; returns the frozen object count."""
    if backend == "deepspeed":
        from dist_lowrank.backends.ds_runtime import prepare_deepspeed

        prepare_deepspeed()
        import deepspeed  # noqa: F401  (its module objects are the bulk of what gets frozen)
    elif backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    elif backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel  # noqa: F401
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@contextmanager
def startup_objects_frozen(backend: str) -> Iterator[int]:
    """Freeze what exists now for the duration of the block, then hand it back to the collector."""
    try:
        yield freeze_startup_objects(backend)
    finally:
        gc.unfreeze()
