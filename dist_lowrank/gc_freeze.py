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
import importlib
from contextlib import contextmanager
from typing import Iterator


# Modules deepspeed.initialize imports on its first call (0.19: the optimizer check loads the Muon optimizer,
# whose torch.compile decorators pull in torch._inductor, networkx, jinja2; the expert-parallel check loads
# auto_ep_layer): ~90k objects a ZeRO-3 switch's gc pass would otherwise walk twice (0.16 s here).
DEEPSPEED_ENGINE_IMPORTS = ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.module_inject.auto_ep_layer",
                            "deepspeed.runtime.zero.stage3", "deepspeed.runtime.zero.stage_1_and_2")


def _first_optimizer_step() -> None:
    """torch.optim imports torch._dynamo (and sympy, ~100k objects) lazily on first use: do it now."""
    import torch

    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.AdamW([weight])
    weight.sum().backward()
    optimizer.step()


def freeze_startup_objects(backend: str) -> int:
    """Import `backend`'s engine library, collect once, then freeze; returns the frozen object count."""
    if backend == "deepspeed":
        from dist_lowrank.backends.ds_runtime import prepare_deepspeed

        prepare_deepspeed()
        import deepspeed  # noqa: F401  (its module objects are the bulk of what gets frozen)

        for name in DEEPSPEED_ENGINE_IMPORTS:
            try:
                importlib.import_module(name)
            except ImportError:  # another DeepSpeed version: the freeze is only less complete
                pass
    elif backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    elif backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel  # noqa: F401
    _first_optimizer_step()
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
