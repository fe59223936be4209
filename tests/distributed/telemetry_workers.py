"""Workers for test_telemetry_api: the README's telemetry example on real ranks (spawn harness)."""
from __future__ import annotations


def deepspeed_telemetry(rank: int, world: int, out_dir: str):
    from examples.telemetry_report import deepspeed_main

    return deepspeed_main(out_dir)


def fsdp2_telemetry(rank: int, world: int, out_dir: str):
    """The example's FSDP2 run, after checking (same ranks, no second spawn) that attach() refuses
    monitor.method exact on FSDP2 row shards before any step: the error each rank raised, by name."""
    import torch

    from dist_lowrank import attach
    from dist_lowrank.backends.fsdp2_backend import FSDP2Backend
    from dist_lowrank.errors import ConfigError
    from examples.common import LOWRANK, mlp
    from examples.fsdp2_cuttlefish import shard
    from examples.telemetry_report import fsdp2_main

    try:
        attach(FSDP2Backend(mlp, shard, lambda params: torch.optim.AdamW(params, lr=2e-3)),
               {**LOWRANK, "monitor": {"method": "exact"}})
        refused = None
    except ConfigError as exc:
        refused = f"{type(exc).__name__}: {exc}"
    return {**fsdp2_main(out_dir), "exact_refused": refused}

