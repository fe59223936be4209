"""DDP + Cuttlefish: the backend owns the DDP wrapper; call `controller.after_step` per step.

    torchrun --nproc_per_node 2 examples/ddp_cuttlefish.py
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import torch

from dist_lowrank import attach
from dist_lowrank.backends.ddp_backend import DDPBackend
from examples.common import LOWRANK, mlp, run_as_script, train


def main(steps: int = 60, lowrank: dict | None = None) -> dict:
    backend = DDPBackend(mlp(), lambda params: torch.optim.AdamW(params, lr=2e-3))
    controller = attach(backend, lowrank or LOWRANK)   # validates the config, measures srank at init
    return train(backend, controller, steps)         # the loop: examples/common.py

if __name__ == "__main__":
    run_as_script(main)
