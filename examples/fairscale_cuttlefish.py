"""fairscale OSS + ShardedDataParallel + Cuttlefish: build them as usual, hand both to the backend, then call
`controller.after_step` once per optimizer step (the backend rebuilds OSS and the wrapper at the switch).

    torchrun --nproc_per_node 2 examples/fairscale_cuttlefish.py [--steps 60] [--result out.json]

`--result PATH` writes each rank's losses, switch step and ranks to PATH.rank<r>.json (the tests read them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import torch

from dist_lowrank import attach
from dist_lowrank.backends.fairscale_backend import FairscaleBackend
from dist_lowrank.device import default_device
from examples.common import LOWRANK, mlp, run_as_script, train


def main(steps: int = 60, lowrank: dict | None = None) -> dict:
    from fairscale.nn.data_parallel import ShardedDataParallel
    from fairscale.optim import OSS

    model = mlp().to(default_device())
    optimizer = OSS(model.parameters(), optim=torch.optim.AdamW, lr=2e-3)  # each rank keeps its share of Adam state
    model = ShardedDataParallel(model, optimizer, reduce_buffer_size=0)  # gradients reduced to their owner
    backend = FairscaleBackend(model, optimizer)       # takes both over: always train through backend.model
    controller = attach(backend, lowrank or LOWRANK)   # validates the config, measures srank at init
    return train(backend, controller, steps)           # the loop: examples/common.py


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--result", default=None, help="write each rank's result to RESULT.rank<r>.json")
    args = parser.parse_args()

    def run() -> dict:
        result = main(args.steps)
        if args.result:
            rank = torch.distributed.get_rank()
            with open(f"{args.result}.rank{rank}.json", "w") as f:
                json.dump(result, f)
        return result

    run_as_script(run)
