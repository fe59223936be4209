"""Accepted keys are used: lowrank.seed drives every random choice, monitor.method exact is exact or refused,
the switch keys are documented; the analytic model covers frozen parameters; the step
window closes cleanly and keeps cold steps out of the throughput."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_lowrank.config import LowRankConfig, config_from_dict
from dist_lowrank.errors import ConfigError
from dist_lowrank.methods.inrank.model import inrank_layers, to_inrank
from dist_lowrank.monitor import RankMonitor
from dist_lowrank.profiling import plugin_rng
from dist_lowrank.shard_view import ShardView, replicated_view
from dist_lowrank.telemetry.analytic import expected_step_bytes
from dist_lowrank.telemetry.params import parameter_counts
from dist_lowrank.telemetry.window import StepWindow

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {f"w{i}": torch.randn(48, 40, generator=gen) for i in range(3)}


def _sranks(seed: int) -> dict[str, float]:
    """Three Lanczos steps only: the estimate still depends on the start vector, i.e. on the seed."""
    monitor = RankMonitor("lanczos", steps=3, seed=seed)
    results = monitor.estimate([replicated_view(n, w) for n, w in _weights().items()])
    return {n: r.value for n, r in results.items()}


def test_seed_drives_the_krylov_start_vectors():
    assert _sranks(0) == _sranks(0)
    assert _sranks(1) == _sranks(1)
    assert all(a != b for a, b in zip(_sranks(0).values(), _sranks(1).values()))


def _inrank_v(seed: int) -> list[torch.Tensor]:
    torch.manual_seed(0)  # the same dense model; only the plugin's seed changes
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16))
    cfg = config_from_dict({"strategy": "inrank", "seed": seed, "inrank": {"init_rank": 2, "buffer": 2}})
    layers = inrank_layers(to_inrank(model, cfg))
    grown = [m.grown_factors(m.u.detach(), m.v.detach(), m.capacity + 8, m.seed + m.capacity + 8)[1]
             for m in layers.values()]
    return [m.v.detach().clone() for m in layers.values()] + grown


def test_seed_drives_inrank_init_and_growth():
    same, other = _inrank_v(5), _inrank_v(6)
    assert all(torch.equal(a, b) for a, b in zip(same, _inrank_v(5)))
    assert all(not torch.equal(a, b) for a, b in zip(same, other))


def test_layer_timing_draws_from_the_seed_and_leaves_the_users_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with plugin_rng(7, torch.device("cpu")):
        first = torch.randn(5)
    assert torch.equal(torch.get_rng_state(), before)
    with plugin_rng(7, torch.device("cpu")):
        again = torch.randn(5)
    with plugin_rng(8, torch.device("cpu")):
        other = torch.randn(5)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_exact_monitor_is_exact_on_replicated_layers_and_refused_on_shards(monkeypatch):
    weights = _weights()
    exact = RankMonitor("exact").estimate([replicated_view(n, w) for n, w in weights.items()])
    for name, w in weights.items():
        s = torch.linalg.svdvals(w.double())
        assert exact[name].value == pytest.approx(float((s ** 2).sum() / s[0] ** 2), rel=1e-12)
    import dist_lowrank.monitor as monitor_module

    monkeypatch.setattr(monitor_module, "is_distributed", lambda: True)  # refused before any collective
    shard = ShardView("blocks.0.attn", (48, 40), 0, weights["w0"][:24].reshape(-1))
    with pytest.raises(ConfigError, match=r"^lowrank\.monitor\.method: 'exact' .*blocks\.0\.attn.*allowed there: "
                                          r"lanczos, power$"):
        RankMonitor("exact").estimate([shard])


def test_analytic_model_counts_frozen_parameters_where_they_are_gathered():
    trainable, frozen = [(8, 6), (8,)], [(8, 6)]
    p, b = 2, 4
    numel = 8 * 6 + 8
    assert expected_step_bytes("fsdp2", trainable, p, frozen_shapes=frozen) == {
        "all_gather": 2 * 0.5 * b * (numel + 48), "reduce_scatter": 0.5 * b * numel}
    assert expected_step_bytes("zero3", trainable, p, frozen_shapes=frozen) == {
        "all_gather": 0.5 * b * (numel + 48), "reduce_scatter": 0.5 * b * numel}
    for replicated in ("ddp", "zero1", "zero2"):  # frozen weights stay put there
        assert expected_step_bytes(replicated, trainable, p, frozen_shapes=frozen) == \
            expected_step_bytes(replicated, trainable, p)


def test_parameter_counts_keep_frozen_apart():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    assert parameter_counts(model) == {"params": 12 + 3 + 6 + 2, "trainable": 3 + 6 + 2, "frozen": 12}


def test_step_window_times_warm_steps_and_resets():
    window = StepWindow()
    window.add({"all_reduce": 100.0, "all_gather_into_tensor": 10.0}, 5.0, 1.0)  # cold: first step of a run
    window.add({"all_reduce": 100.0, "all_gather_into_tensor": 10.0}, 0.2, 0.9)
    window.add({"all_reduce": 100.0, "all_gather_into_tensor": 10.0}, 0.4, 0.8)
    numbers = window.close()
    assert numbers == {"window_steps": 3, "step_time": pytest.approx(0.3),
                       "comm_bytes_per_step": {"all_reduce": 100.0, "all_gather": 10.0}}
    assert window.loss == 0.8 and window.steps == 0
    window.cold()
    window.add({}, 2.0, 0.5)  # the only step of a window after a change: its time is all there is
    assert window.close()["step_time"] == 2.0
