"""The gpu tier: the parity tests again, with NCCL on two CUDA devices (one rank per GPU, cuda:LOCAL_RANK).

Run with `make test-gpu` (or `.venv/bin/python -m pytest -m gpu tests/gpu -rs`). Without NCCL and two CUDA
devices every test here is skipped and the reason is printed. What runs:
- the README examples (DDP, FSDP2, DeepSpeed ZeRO-1/2/3 through the one changed call) on 2 NCCL ranks against
  the one-process reference (tests/distributed/test_user_api.py's check: same switch step, same ranks,
  losses following the reference);
- every mixed-precision switch (DeepSpeed bf16 / fp16 with the loss scale, FSDP2 MixedPrecisionPolicy, DDP
  autocast) against torch.linalg.svd, with tests/distributed/test_mixed_precision.py's checks.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dist_harness import run_ranks
from tests.distributed.test_mixed_precision import (test_fp16_loss_scale_continues_across_rebuild,  # noqa: F401
                                                    test_fsdp2_mixed_precision_computes_in_bf16,
                                                    test_layer_timing_at_training_dtype,
                                                    test_switch_factors_and_sranks_from_fp32)
from tests.distributed.test_user_api import check

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
NCCL = dist.is_available() and dist.is_nccl_available()
REASON = (f"gpu tier: needs NCCL and >= 2 CUDA devices; here torch {torch.__version__} sees {GPUS} CUDA "
          f"device(s), NCCL {'available' if NCCL else 'not available'}")
NCCL_ENV = {"DIST_LOWRANK_DIST_BACKEND": "nccl", "DS_ACCELERATOR": "cuda"}

pytestmark = [pytest.mark.gpu, pytest.mark.dist, pytest.mark.timeout(600),
              pytest.mark.skipif(GPUS < 2 or not NCCL, reason=REASON)]


@pytest.fixture(scope="module")
def reference():
    from dist_lowrank import attach
    from dist_lowrank.backends.local_backend import LocalBackend
    from examples.common import LOWRANK, mlp, train

    backend = LocalBackend(mlp(), lambda params: torch.optim.AdamW(params, lr=2e-3))
    return train(backend, attach(backend, LOWRANK), steps=60, batch=64)  # one process, the global batch


@pytest.fixture(scope="module")
def runs():
    """The mixed-precision scenarios on 2 NCCL ranks (the imported tests read this fixture)."""
    from tests.distributed.precision_workers import all_precisions

    return run_ranks(all_precisions, timeout=500, env=NCCL_ENV)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_nccl_matches_reference(stage, reference):
    from tests.distributed.example_workers import deepspeed_example

    check(run_ranks(deepspeed_example, args=(stage,), timeout=300, env=NCCL_ENV), reference)


def test_fsdp2_nccl_matches_reference(reference):
    from tests.distributed.example_workers import fsdp2_example

    check(run_ranks(fsdp2_example, timeout=300, env=NCCL_ENV), reference)


def test_ddp_nccl_matches_reference(reference):
    from tests.distributed.example_workers import ddp_example

    check(run_ranks(ddp_example, timeout=300, env=NCCL_ENV), reference)


def test_ranks_sit_on_their_own_gpu():
    """Each rank's model, batch and collectives on cuda:LOCAL_RANK (DDP example's backend)."""
    results = run_ranks(gpu_placement, timeout=300, env=NCCL_ENV)
    assert results == [("cuda", 0, "nccl", 0), ("cuda", 1, "nccl", 1)]


def gpu_placement(rank: int, world: int):
    from dist_lowrank.backends.ddp_backend import DDPBackend
    from dist_lowrank.device import module_device
    from examples.common import mlp

    backend = DDPBackend(mlp(), lambda p: torch.optim.AdamW(p, lr=1e-3))
    device = module_device(backend.model)
    return device.type, device.index, dist.get_backend(), torch.cuda.current_device()
