"""Rank functions for test_private_apis: the registry checked against real engines on a 1-rank group."""
from __future__ import annotations


def check_all(rank: int, world: int) -> dict:
    from dist_lowrank.backends.private_apis import ENGINES, check

    return {engine: check(engine) for engine in ENGINES}


def check_fake_attribute(rank: int, world: int) -> list:
    """A run-time attribute no DeepSpeed has, on a real ZeRO-3 optimizer: must be reported."""
    from dist_lowrank.backends.private_apis import Entry, check

    return check("deepspeed", entries=[Entry("<ZeRO-3 optimizer>.no_such_private_attr", "test", "nowhere",
                                             "attribute")])
