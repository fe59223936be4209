"""Run the README examples on real ranks (module-level functions for the spawn harness)."""
from __future__ import annotations


def deepspeed_example(rank: int, world: int, stage: int):
    from examples.deepspeed_cuttlefish import main

    return main(stage=stage)


def fsdp2_example(rank: int, world: int):
    from examples.fsdp2_cuttlefish import main

    return main()


def ddp_example(rank: int, world: int):
    from examples.ddp_cuttlefish import main

    return main()
