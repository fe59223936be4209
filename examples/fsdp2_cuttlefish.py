"""FSDP2 (`fully_shard`) + Cuttlefish: build with a model function and a sharding function, then call
`controller.after_step` once per optimizer step.

    torchrun --nproc_per_node 2 examples/fsdp2_cuttlefish.py
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import torch
from torch import nn

from dist_lowrank import attach
from dist_lowrank.backends.fsdp2_backend import FSDP2Backend
from examples.common import LOWRANK, mlp, run_as_script, train


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(p.requires_grad for p in layer.parameters()):
            fully_shard(layer)
    return fully_shard(model)


def main(steps: int = 60, lowrank: dict | None = None) -> dict:
    backend = FSDP2Backend(mlp, shard, lambda params: torch.optim.AdamW(params, lr=2e-3))
    controller = attach(backend, lowrank or LOWRANK)   # validates the config, measures srank at init
    return train(backend, controller, steps)         # the loop: examples/common.py

if __name__ == "__main__":
    run_as_script(main)
