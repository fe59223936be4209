#!/usr/bin/env python
"""Launcher entry for `dist-lowrank train` as a script (the deepspeed launcher and mpirun run scripts).

    deepspeed --num_gpus 2 --master_port 29600 launch/train.py configs/gpt_shakespeare_zero2.yaml
    torchrun --standalone --nproc_per_node 2 launch/train.py configs/gpt_shakespeare_zero2.yaml
    mpirun -np 2 python launch/train.py configs/gpt_shakespeare_zero2.yaml   (rank discovery via mpi4py)
The deepspeed launcher appends --local_rank=N, which the train command accepts.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dist_lowrank.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
