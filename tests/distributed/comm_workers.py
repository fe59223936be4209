"""Measured bytes per step (our counter) on each backend, before and after a switch."""
from __future__ import annotations

from tests.distributed.switch_common import PLAN_RANKS, local_batch, loss_fn, make_model, optimizer_factory
from dist_lowrank.reshape.builders import switch_change


def _steps(backend, counter, first: int, count: int, rank: int, world: int) -> dict:
    from dist_lowrank.telemetry.analytic import family

    counter.reset()
    for step in range(first, first + count):
        backend.backward(loss_fn(backend.model, local_batch(step, rank, world)))
        backend.step()
    out: dict[str, float] = {}
    for op, value in counter.bytes.items():
        out[family(op)] = out.get(family(op), 0.0) + value / count
    return out


def comm_worker(rank: int, world: int, name: str):
    from dist_lowrank.telemetry.comm import CommCounter

    counter = CommCounter().install()  # before DeepSpeed builds its comm backend
    if name == "ddp":
        from dist_lowrank.backends.ddp_backend import DDPBackend

        backend = DDPBackend(make_model(), optimizer_factory, comm_hook=counter.ddp_hook())
    elif name == "fsdp2":
        from dist_lowrank.backends.fsdp2_backend import FSDP2Backend
        from tests.distributed.fsdp_workers import parallelize

        backend = FSDP2Backend(make_model, parallelize, optimizer_factory)
    else:
        from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend
        from tests.distributed.ds_workers import ds_config

        backend = DeepSpeedBackend(make_model(), ds_config(int(name[-1]), world), optimizer_factory)

    def shapes():
        return [tuple(getattr(p, "ds_shape", p.shape)) for p in backend.unwrapped_model().parameters()
                if p.requires_grad]

    _steps(backend, counter, 0, 1, rank, world)  # warm-up (lazy state, first gathers)
    full = _steps(backend, counter, 1, 3, rank, world)
    full_shapes = shapes()
    backend.apply(switch_change(backend.unwrapped_model(), dict(PLAN_RANKS), 4))
    _steps(backend, counter, 4, 2, rank, world)  # warm-up: DeepSpeed ZeRO-3 records its parameter trace
    low = _steps(backend, counter, 6, 3, rank, world)
    counter.uninstall()
    return {"full": full, "low": low, "full_shapes": full_shapes, "low_shapes": shapes()}
