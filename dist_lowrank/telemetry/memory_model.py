"""Expected parameter + gradient + optimizer-state bytes held per rank, per backend, from parameter shapes.

The memory counterpart of telemetry.analytic (same backends, same padding), so that a rank plan can be
judged at world sizes that cannot run here. Assumptions (Adam/AdamW, no activation or buffer memory, no
transient all-gather buffers, no fp16 master copy): weights `param_bytes` (fp32: 4), gradients
`grad_bytes` (fp32: 4), Adam's exp_avg and exp_avg_sq `state_bytes` (2 × fp32: 8) per element, so
16 bytes per parameter when nothing is sharded. With P = ΣN elements and world p:
- DDP: everything replicated: P·(w + g + s).
- ZeRO-1: weights and gradients replicated, optimizer states in the flat buffer padded to a multiple of
  p (as in analytic): P·(w + g) + pad(P)/p · s.
- ZeRO-2: weights replicated, gradients and states partitioned: P·w + pad(P)/p · (g + s).
- ZeRO-3: each parameter padded to a multiple of p and partitioned: Σ pad(N)/p · (w + g + s).
- FSDP2: each parameter's dim 0 padded to a multiple of p and sharded: Σ pad₀(N)/p · (w + g + s).
"""
from __future__ import annotations

import math
from typing import Iterable

BACKENDS = ("ddp", "fsdp2", "zero1", "zero2", "zero3")


def _ceil_div(value: int, divisor: int) -> int:
    return -(-value // divisor)


def param_state_bytes(backend: str, shapes: Iterable[tuple[int, ...]], world: int, param_bytes: int = 4,
                      grad_bytes: int = 4, state_bytes: int = 8) -> dict[str, float]:
    """{"params", "grads", "optim", "total": bytes this rank holds} for trainable parameters of these shapes."""
    shapes = [tuple(s) for s in shapes]
    p = max(1, int(world))
    w, g, s = param_bytes, grad_bytes, state_bytes
    numels = [math.prod(shape) for shape in shapes]
    total = sum(numels)
    flat_part = _ceil_div(total, p)
    if backend == "ddp":
        out = {"params": total * w, "grads": total * g, "optim": total * s}
    elif backend == "zero1":
        out = {"params": total * w, "grads": total * g, "optim": flat_part * s}
    elif backend == "zero2":
        out = {"params": total * w, "grads": flat_part * g, "optim": flat_part * s}
    elif backend in ("zero3", "fsdp2"):
        if backend == "zero3":
            local = sum(_ceil_div(n, p) for n in numels)
        else:
            local = sum(_ceil_div(shape[0], p) * math.prod(shape[1:]) if shape else 1 for shape in shapes)
        out = {"params": local * w, "grads": local * g, "optim": local * s}
    else:
        raise ValueError(f"backend: got {backend!r}; allowed: {', '.join(BACKENDS)}")
    out["total"] = out["params"] + out["grads"] + out["optim"]
    return {k: float(v) for k, v in out.items()}
