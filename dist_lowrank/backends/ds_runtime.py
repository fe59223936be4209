"""DeepSpeed on this machine's terms: CPU accelerator when there is no GPU, no needless JIT build.

`deepspeed.init_distributed` builds a shared-memory op (`deepspeed_shm_comm`, 50–90 s on a cold
cache) that only inference all-reduce uses. Training never calls it, so on CPU we mark the op
unavailable before DeepSpeed's communication backend is created; on GPUs nothing is touched.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dist_lowrank.device import before_process_group, default_dist_backend, is_distributed


def prepare_deepspeed() -> None:
    """Select the CPU accelerator when CUDA is absent; skip the CPU shm op build. Idempotent."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.getcwd(), ".torch_extensions"))
        import deepspeed.ops

        compatible = deepspeed.ops.__compatible_ops__
        if isinstance(compatible, dict):
            compatible["deepspeed_shm_comm"] = False


def init_deepspeed_distributed() -> None:
    """Join (or create) the process group the way DeepSpeed expects, with the backend for this device."""
    prepare_deepspeed()
    import deepspeed

    if not is_distributed():
        before_process_group()  # cuda:LOCAL_RANK bound (DeepSpeed does not set it first), torch._dynamo imported
        deepspeed.init_distributed(dist_backend=default_dist_backend())
    else:
        deepspeed.init_distributed(dist_backend=dist.get_backend())
