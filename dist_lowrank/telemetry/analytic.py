"""Expected bytes on the wire per training step, per backend, from parameter shapes (ring model).

Each rank sends (p−1)/p · N for an all-gather or reduce-scatter of N bytes and twice that for an
all-reduce (see telemetry.comm). Per optimizer step with fp32 parameters/gradients (b = 4 bytes):
- DDP: all-reduce of every gradient: 2(p−1)/p · b·ΣN.
- FSDP2 (reshard after forward): all-gather in forward and again in backward, reduce-scatter of the
  gradients; each parameter's dim 0 padded to a multiple of p: 3(p−1)/p · b·Σ pad₀(N).
- DeepSpeed ZeRO-1/2 as deepspeed 0.19.8 runs here (gloo): gradients all-reduced, then the updated fp32
  partitions all-gathered into the flat buffer (padded to a multiple of p): 2(p−1)/p·b·ΣN + (p−1)/p·b·pad(ΣN).
- DeepSpeed ZeRO-3: all-gathers of every (per-parameter padded) partition — once in the forward, and again
  in the backward if DeepSpeed released it in between: it keeps a parameter whose next use lies within
  `stage3_max_reuse_distance` elements (default 1e9), and a parameter's backward comes at most the model's
  element count after its forward, so g = 1 gather per step when the model is within that distance, else 2
  (`zero3_gathers`) — and a reduce-scatter of the gradients: (g+1)(p−1)/p · b·Σ pad(N).
Frozen parameters (requires_grad False, e.g. InRank's W0) have no gradient, so they add nothing to
all-reduces and reduce-scatters; but FSDP2 and ZeRO-3 shard them like the rest and all-gather them for
the forward (and FSDP2 again for the backward, which needs them for the input gradient): their padded
sizes join the all-gather terms there. DDP and ZeRO-1/2 keep them replicated and never send them.
The comm test checks the measured counter against these within 2%; tools/comm_at_scale.py uses them for
model shapes and world sizes that cannot run here.
"""
from __future__ import annotations

import math
from typing import Iterable


def _ceil_to(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def expected_step_bytes(backend: str, shapes: Iterable[tuple[int, ...]], world: int, bytes_per_elem: int = 4,
                        zero3_gathers: int = 1, frozen_shapes: Iterable[tuple[int, ...]] = ()) -> dict[str, float]:
    """{op: bytes this rank sends per optimizer step} for trainable parameters of `shapes` beside frozen
    parameters of `frozen_shapes`."""
    shapes = [tuple(s) for s in shapes]
    frozen = [tuple(s) for s in frozen_shapes]
    p, b = world, bytes_per_elem
    if p <= 1:
        return {}
    frac = (p - 1) / p
    numels = [math.prod(s) for s in shapes]
    total = sum(numels)
    if backend == "ddp":
        return {"all_reduce": 2 * frac * b * total}
    if backend == "fsdp2":
        padded = sum(_ceil_to(s[0], p) * math.prod(s[1:]) for s in shapes)
        gathered = padded + sum(_ceil_to(s[0], p) * math.prod(s[1:]) for s in frozen)
        return {"all_gather": 2 * frac * b * gathered, "reduce_scatter": frac * b * padded}
    if backend in ("zero1", "zero2"):
        return {"all_reduce": 2 * frac * b * total, "all_gather": frac * b * _ceil_to(total, p)}
    if backend == "zero3":
        padded = sum(_ceil_to(n, p) for n in numels)
        gathered = padded + sum(_ceil_to(math.prod(s), p) for s in frozen)
        return {"all_gather": zero3_gathers * frac * b * gathered, "reduce_scatter": frac * b * padded}
    raise ValueError(f"backend: got {backend!r}; allowed: ddp, fsdp2, zero1, zero2, zero3")


def zero3_gathers(total_numel: int, max_reuse_distance: float = 1e9) -> int:
    """All-gathers per parameter per ZeRO-3 step (see the module docstring): 1 within the reuse distance, else 2."""
    return 1 if total_numel <= max_reuse_distance else 2


def family(op: str) -> str:
    """Group the counter's op names into the model's families (all_gather_single → all_gather, ...)."""
    for name in ("all_reduce", "all_gather", "reduce_scatter"):
        if op.startswith(name):
            return name
    return op
