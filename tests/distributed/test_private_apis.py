"""The private torch/DeepSpeed APIs of the backends (backends/private_apis.py) exist on the installed versions,
checked on real objects (1-rank gloo DeepSpeed ZeRO-2/3 engines, a fairscale OSS + ShardedDataParallel); a missing one is named with the version."""
from __future__ import annotations

import torch

from tests.dist_harness import run_ranks
from tests.distributed import private_api_workers as workers


def _versions() -> tuple[str, str]:
    import deepspeed

    return torch.__version__, deepspeed.__version__


def test_every_private_api_is_present_on_real_engines():
    (missing,) = run_ranks(workers.check_all, world=1, timeout=120)
    assert set(missing) == {"torch", "fsdp2", "ddp", "deepspeed", "fairscale"}
    assert all(lines == [] for lines in missing.values()), "\n".join(sum(missing.values(), []))


def test_a_missing_instance_attribute_is_named_with_the_versions():
    (lines,) = run_ranks(workers.check_fake_attribute, world=1, timeout=120)
    torch_version, ds_version = _versions()
    assert len(lines) == 1
    assert "<ZeRO-3 optimizer>.no_such_private_attr" in lines[0] and "deepspeed" in lines[0]
    assert f"torch {torch_version}" in lines[0] and f"deepspeed {ds_version}" in lines[0]
