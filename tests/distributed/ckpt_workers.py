"""Rank functions for the fault tests (importable by spawned processes)."""
from __future__ import annotations

from tests.distributed.ckpt_common import CKPT, CONFIG


def train_worker(rank: int, world: int, overrides: list[str]) -> dict:
    """The tiny GPT job through dist_lowrank.train.loop.train in an already initialized process group."""
    from dist_lowrank.train.config_file import load_train_config
    from dist_lowrank.train.loop import train

    return train(*load_train_config(CONFIG, CKPT + overrides))
