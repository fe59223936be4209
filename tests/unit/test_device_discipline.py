"""Devices without a GPU: each entry point binds cuda:LOCAL_RANK before the process group exists; the CPU
device check (tests/device_discipline.py) fails on the bugs it exists for; layer timing uses the training dtype."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.device_discipline import ACCEL, DeviceDiscipline

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


class _Stop(Exception):
    """Raised by the stand-in process-group init: nothing after it matters here."""


@pytest.fixture
def fake_gpus(monkeypatch):
    """A 4-GPU machine as torch sees it; set_device and process-group creation recorded, in order."""
    import deepspeed  # noqa: F401  imported before torch "has" CUDA: DeepSpeed picks its accelerator at import

    events: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: events.append(("set_device", torch.device(device))))

    def init(backend=None, *args, **kwargs):
        events.append(("init", kwargs.get("dist_backend", backend)))
        raise _Stop

    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.delenv("DIST_LOWRANK_DIST_BACKEND", raising=False)
    return events, init


def _launcher_init(fake):
    from dist_lowrank.train.launch_local import init_process_group

    init_process_group()


def _example_script(fake):
    from examples.common import run_as_script

    run_as_script(lambda: pytest.fail("main must not run before the process group"))


def _deepspeed_init(fake, monkeypatch):
    import deepspeed

    from dist_lowrank.backends.ds_runtime import init_deepspeed_distributed

    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: fake[1](**kw))
    init_deepspeed_distributed()


@pytest.mark.parametrize("entry", ["launcher", "example", "deepspeed"])
def test_rank_binds_its_gpu_before_the_process_group(entry, fake_gpus, monkeypatch):
    events, _ = fake_gpus
    with pytest.raises(_Stop):
        if entry == "launcher":
            _launcher_init(fake_gpus)
        elif entry == "example":
            _example_script(fake_gpus)
        else:
            _deepspeed_init(fake_gpus, monkeypatch)
    assert events == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]


def test_harness_rank_binds_its_gpu_first(fake_gpus, monkeypatch):
    """The test harness's worker (the gpu tier runs parity tests through it with NCCL)."""
    import os

    from dist_lowrank import multiproc

    events, _ = fake_gpus
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the worker exports RANK etc.; keep them local

    class Queue:
        def put(self, item):
            events.append(("result", item[1]))

    multiproc._worker(lambda rank, world: None, 1, 2, 12345, {"DIST_LOWRANK_DIST_BACKEND": "nccl"}, Queue(), ())
    assert events[:2] == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]
    assert events[2] == ("result", "error")  # the stand-in init stopped it, reported like any rank error


@pytest.fixture
def one_rank_group(tmp_path):
    """A real one-rank gloo group: the monitor's sharded path and collectives run in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_check_catches_host_krylov_vectors_and_passes_the_fix(one_rank_group, monkeypatch):
    import dist_lowrank.monitor as monitor
    from dist_lowrank.monitor import RankMonitor
    from dist_lowrank.shard_view import ShardView

    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.linalg.svdvals(weight.double())
    expected = float((sigma ** 2).sum() / sigma[0] ** 2)
    view = ShardView("w", (48, 32), 0, weight.reshape(-1))  # a "shard" (not replicated): the Krylov path
    with DeviceDiscipline() as check:
        check.mark(weight)
        result = RankMonitor("lanczos", 32).estimate([view])["w"]
    assert check.violations == [] and check.ops > 100
    assert result.value == pytest.approx(expected, rel=1e-6)

    real = monitor.sigma_max_gram
    monkeypatch.setattr(monitor, "sigma_max_gram", lambda *a, device=None, **k: real(*a, **k))  # the old bug
    with DeviceDiscipline() as check:
        check.mark(weight)
        RankMonitor("lanczos", 8).estimate([view])
    assert any("monitor.py" in v.where and v.devices == ("accel", "host") for v in check.violations)


def test_check_catches_an_unmoved_batch_and_a_host_collective(one_rank_group):
    import dist_lowrank.device as device  # read at call time: the check answers cuda:LOCAL_RANK
    from examples.common import to_model_device

    with DeviceDiscipline() as check:
        model = nn.Sequential(nn.Linear(8, 4)).to(device.default_device())
        x = torch.randn(2, 8)
        model(x)  # the batch was never moved
        assert [v.op for v in check.violations] == ["linear"]
        check.violations.clear()
        model(*to_model_device(model, x))
        dist.all_reduce(torch.ones(3, device=device.comm_device()))
        assert check.violations == []
        dist.all_reduce(torch.ones(3))  # NCCL takes CUDA tensors only
        assert [v.op for v in check.violations] == ["dist.all_reduce"]
        assert check.tag(next(model.parameters())) == ACCEL


def test_layer_timing_runs_in_the_training_dtype():
    from dist_lowrank.profiling import InputShape, param_dtype, stand_in, record_input_shapes, time_module

    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)).to(torch.bfloat16)
    shapes: dict = {}
    with record_input_shapes(model, ["1"], shapes):
        model(torch.randn(3, 8, dtype=torch.bfloat16))
    assert shapes["1"] == (3, 16) and shapes["1"].dtype == torch.bfloat16 and shapes["1"].autocast is None
    factorized = stand_in(model[1], 4, torch.device("cpu"), param_dtype(shapes["1"]))
    assert {p.dtype for p in factorized.parameters()} == {torch.bfloat16}
    assert time_module(factorized, shapes["1"], 1, torch.device("cpu")) > 0

    fp32 = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    shapes = {}
    with record_input_shapes(fp32, ["1"], shapes), torch.autocast("cpu", dtype=torch.bfloat16):
        fp32(torch.randn(3, 8))
    assert shapes["1"].autocast == torch.bfloat16 and param_dtype(shapes["1"]) == torch.float32
    assert time_module(stand_in(fp32[1], None, torch.device("cpu")), shapes["1"], 1, torch.device("cpu")) > 0
    assert param_dtype(InputShape((2, 3))) == torch.float32
