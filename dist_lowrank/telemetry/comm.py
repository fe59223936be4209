"""Our own collective byte counter, with one documented meaning per op (ring algorithm model).

For a payload of n bytes per rank in a group of p ranks, bytes each rank sends on the wire:
- all_reduce: 2(p−1)/p · n (reduce-scatter + all-gather ring)
- all_gather / all_gather_into_tensor / all_gather_single: (p−1)/p · N, N = the gathered output size
- reduce_scatter / reduce_scatter_tensor / reduce_scatter_single: (p−1)/p · N, N = the input size
- broadcast: (p−1)/p · n (pipelined chain), reduce: (p−1)/p · n, all_to_all_single: (p−1)/p · n
DeepSpeed's comms logger counts all_gather and reduce_scatter differently and does not see FSDP2; this
counter wraps `torch.distributed` itself (what DeepSpeed, FSDP2 and our monitor call) and DDP's bucket
all-reduces through a DDP communication hook.
"""
from __future__ import annotations

import functools

import sys
import threading
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

# op -> (position, keyword) of the tensor whose size defines the traffic, and the ring factor on (p−1)/p
_TRAFFIC = {
    "all_reduce": (0, "tensor", 2), "broadcast": (0, "tensor", 1), "reduce": (0, "tensor", 1),
    "all_gather_into_tensor": (0, "output_tensor", 1), "all_gather_single": (0, "output_tensor", 1),
    "all_gather": (0, "tensor_list", 1),
    "reduce_scatter_tensor": (1, "input", 1), "reduce_scatter_single": (1, "input", 1),
    "reduce_scatter": (1, "input_list", 1), "all_to_all_single": (1, "input", 1),
}
_OPS = tuple(_TRAFFIC)


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(x) for x in obj)
    return 0


def wire_bytes(op: str, args: tuple, kwargs: dict, p: int) -> float:
    """Bytes this rank sends for one call of `op`, under the ring model above."""
    if p <= 1:
        return 0.0
    position, keyword, factor = _TRAFFIC[op]
    tensor = args[position] if len(args) > position else kwargs.get(keyword)
    return factor * (p - 1) / p * _nbytes(tensor)


class CommCounter:
    """Counts calls and wire bytes per op while installed; `phase` labels what is being counted."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, float] = defaultdict(float)
        self._originals: dict[str, Callable] = {}
        self._lock = threading.Lock()
        self.paused = False

    @contextmanager
    def pause(self) -> Iterator[None]:
        """Collectives issued inside are not counted (e.g. the logger's own loss average)."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def record(self, op: str, nbytes: float) -> None:
        if self.paused:
            return
        with self._lock:
            self.calls[op] += 1
            self.bytes[op] += nbytes

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def total(self) -> float:
        return sum(self.bytes.values())

    def snapshot(self) -> dict[str, float]:
        return dict(self.bytes)

    def install(self) -> "CommCounter":
        """Wrap torch.distributed's collectives (idempotent). Install before DeepSpeed initializes: its
        comm backend keeps references to some torch.distributed functions."""
        for op in _OPS:
            original = getattr(dist, op, None)
            if original is None or op in self._originals:
                continue
            self._originals[op] = original

            def wrapper(*args, __op=op, __orig=original, **kwargs):
                group = kwargs.get("group")
                p = dist.get_world_size(group) if dist.is_initialized() else 1
                self.record(__op, wire_bytes(__op, args, kwargs, p))
                return __orig(*args, **kwargs)

            functools.update_wrapper(wrapper, original)  # keeps the op's name for whoever wraps it next
            setattr(dist, op, wrapper)
        _rebind_deepspeed()
        return self

    def uninstall(self) -> None:
        for op, original in self._originals.items():
            setattr(dist, op, original)
        self._originals.clear()
        _rebind_deepspeed()

    def ddp_hook(self) -> Callable:
        """A DDP comm hook equal to the default (all-reduce, then divide by world size), counted."""
        def hook(state: Any, bucket: "dist.GradBucket") -> torch.futures.Future:
            tensor = bucket.buffer()
            p = dist.get_world_size()
            self.record("all_reduce", 2 * (p - 1) / p * _nbytes(tensor))
            original = self._originals.get("all_reduce", dist.all_reduce)
            tensor.div_(p)
            return original(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

        # DDP checks the annotations themselves (this module's are strings under `from __future__`).
        hook.__annotations__ = {"state": object, "bucket": dist.GradBucket,
                                "return": torch.futures.Future[torch.Tensor]}
        return hook


def _rebind_deepspeed() -> None:
    """DeepSpeed's torch comm backend, once made (deepspeed.init_distributed), holds its own references to
    all_gather_into_tensor and reduce_scatter_tensor: have it look them up again (ours, or the originals),
    so a counter installed after the user initialized DeepSpeed still sees ZeRO's gathers and scatters."""
    comm = sys.modules.get("deepspeed.comm.comm")
    cdb = getattr(comm, "cdb", None) if comm is not None else None
    for attr, getter in (("all_gather_function", "get_all_gather_function"),
                         ("reduce_scatter_function", "get_reduce_scatter_function")):
        if cdb is not None and hasattr(cdb, attr) and hasattr(cdb, getter):
            setattr(cdb, attr, getattr(cdb, getter)())


@contextmanager
def counting() -> Iterator[CommCounter]:
    counter = CommCounter().install()
    try:
        yield counter
    finally:
        counter.uninstall()
