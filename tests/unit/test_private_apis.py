"""The registry of private torch/DeepSpeed APIs (backends/private_apis.py): imports and class attributes
resolve now; one taken away is reported in one line naming the entry, the engine and the installed version."""
from __future__ import annotations

import pytest
import torch

from dist_lowrank.backends import private_apis
from dist_lowrank.backends.private_apis import ENGINES, REGISTRY, check


@pytest.mark.parametrize("engine", ENGINES)
def test_static_entries_resolve(engine):
    assert check(engine, instances=False) == []


def test_torch_instance_entries_resolve():
    assert check("torch") == []


def test_every_entry_says_why_and_where():
    for engine in ENGINES:
        for entry in REGISTRY[engine]:
            assert entry.why and entry.used_in and entry.kind in ("import", "attribute"), entry


def test_a_removed_import_is_named_with_engine_and_version(monkeypatch):
    import torch.distributed.tensor._utils as utils

    monkeypatch.delattr(utils, "compute_local_shape_and_global_offset")
    lines = check("fsdp2", instances=False)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("fsdp2: ")
    assert "torch.distributed.tensor._utils.compute_local_shape_and_global_offset" in lines[0]
    assert f"torch {torch.__version__}" in lines[0]


def test_a_removed_instance_attribute_is_named(monkeypatch):
    monkeypatch.setitem(private_apis.OBJECT_BUILDERS, "torch", lambda: {
        "torch.optim.lr_scheduler.SequentialLR": object(), "torch.optim.lr_scheduler.ChainedScheduler": object()})
    lines = check("torch")
    assert len(lines) == 2
    assert "SequentialLR._schedulers" in lines[0] and f"torch {torch.__version__}" in lines[0]


def test_unknown_engine_is_named():
    with pytest.raises(KeyError, match="engine"):
        check("megatron")
