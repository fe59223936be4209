"""Releasing a DeepSpeed engine for good: `destroy()` plus what it leaves behind on the module we keep.

A rebuild keeps the user's module (and every untouched parameter) but drops the engine. `engine.destroy()` alone
leaves three roots that keep the old engine, its optimizer, its trace and the replaced parameters alive (checked
with weakrefs in the tests); the first two would also run on the next forward/backward:
- the engine's forward hooks on the module,
- ZeRO-3's per-module backward autograd Functions (`pre_bwd_fn`, `post_bwd_fn`),
- ZeRO-3's class-level `lru_cache` of the params each module releases.
"""
from __future__ import annotations

from typing import Any

from torch import nn

ENGINE_HOOKS = ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check")


def release_engine(engine: Any) -> None:
    """Destroy `engine` and remove what would keep it (or run it) after that; its module stays usable."""
    module = engine.module
    engine.destroy()
    forget_zero3_backward_functions(module)
    for attr in ENGINE_HOOKS:
        handle = getattr(engine, attr, None)
        if handle is not None:
            handle.remove()
            setattr(engine, attr, None)
    clear_zero3_release_cache()


def forget_zero3_backward_functions(module: nn.Module) -> None:
    """Drop the autograd Functions ZeRO-3 stores on each submodule (`pre_bwd_fn`, `post_bwd_fn`).

    They close over the engine's `DeepSpeedZeRoOffload`, and a new engine registers its own only where
    they are absent: left in place, the modules we keep would run the *old* engine's backward fetch and
    release (and keep its coordinator, trace and replaced parameters alive).
    """
    for sub in module.modules():
        for attr in ("pre_bwd_fn", "post_bwd_fn", "applied_pre_backward_ref_cnt"):
            sub.__dict__.pop(attr, None)


def clear_zero3_release_cache() -> None:
    """Empty ZeRO-3's class-level `lru_cache` on `PartitionedParameterCoordinator.__params_to_release`.

    Its keys are (coordinator, module, step): a process-wide root that keeps every old coordinator, the
    replaced modules and their parameters (partitions included) alive after `destroy()`. It is only a
    memo of which params a module releases, so clearing it costs one recomputation per module.
    """
    try:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    except ImportError:
        return
    fn = vars(PartitionedParameterCoordinator).get("_PartitionedParameterCoordinator__params_to_release")
    cells = getattr(fn, "__closure__", None) or ()  # wrapped by instrument_w_nvtx (no functools.wraps)
    for candidate in (fn, getattr(fn, "__wrapped__", None), *(c.cell_contents for c in cells)):
        if hasattr(candidate, "cache_clear"):
            candidate.cache_clear()
