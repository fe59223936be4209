"""The single-process proof: Cuttlefish switches by itself on Fashion-MNIST, and it pays."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from dist_lowrank.reshape.builders import switch_change
from dist_lowrank.backends.local_backend import LocalBackend
from dist_lowrank.train.config_file import load_train_config
from dist_lowrank.train.loop import train

pytestmark = pytest.mark.unit

SMALL = ["run.steps=100", "run.width=16", "run.hidden=128", "run.eval_samples=1000", "run.eval_every=0",
         "lowrank.monitor.cadence_steps=10", "lowrank.cuttlefish.min_switch_step=30",
         "lowrank.cuttlefish.max_switch_step=60", "run.log_every=20"]


@pytest.mark.timeout(300)
def test_cuttlefish_switches_and_matches_full_rank(tmp_path):
    run, lowrank = load_train_config("configs/demo.yaml", SMALL + [f"run.out_dir={tmp_path / 'low'}"])
    low = train(run, lowrank)
    run_full, lowrank_full = load_train_config("configs/demo.yaml", SMALL + [f"run.out_dir={tmp_path / 'full'}",
                                                                            "lowrank.strategy=none"])
    full = train(run_full, lowrank_full)
    assert low["switch_step"] is not None and 30 <= low["switch_step"] <= 60
    assert low["params_final"] < 0.5 * full["params_final"]
    assert low["final_eval"]["val_acc"] > 0.7
    assert abs(low["final_eval"]["val_acc"] - full["final_eval"]["val_acc"]) < 0.05
    events = [json.loads(line) for line in (tmp_path / "low" / "events.jsonl").read_text().splitlines()]
    switch = [e for e in events if e["event"] == "switch"]
    assert len(switch) == 1 and switch[0]["ranks"] == low["ranks"]
    assert set(switch[0]["reasons"]) == {"features.3", "features.7", "features.10", "classifier.1"}
    assert (tmp_path / "low" / "summary.json").exists()


def test_local_switch_keeps_untouched_optimizer_state_bitwise():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                                torch.nn.ReLU(), torch.nn.Linear(32, 3))
    backend = LocalBackend(model, lambda p: torch.optim.AdamW(p, lr=1e-2))
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    for _ in range(3):
        backend.backward(torch.nn.functional.cross_entropy(backend.model(x), y))
        backend.step()
    before = {n: copy.deepcopy(backend.optimizer.state[p]) for n, p in model.named_parameters()}
    reference = copy.deepcopy(model)
    from dist_lowrank.surgery import apply_rank_plan

    apply_rank_plan(reference, {"2": 6})
    backend.apply(switch_change(backend.unwrapped_model(), {"2": 6}, 3))
    assert torch.allclose(backend.model(x), reference(x), atol=1e-6)
    named = dict(backend.model.named_parameters())
    for name in ("0.weight", "0.bias", "4.weight", "4.bias"):
        state = backend.optimizer.state[named[name]]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], before[name][key])
    assert all(not backend.optimizer.state[named[n]] for n in ("2.first.weight", "2.second.weight", "2.second.bias"))
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(backend.model(x), y)
        losses.append(float(loss.detach()))
        backend.backward(loss)
        backend.step()
    assert losses[-1] < losses[0]
    assert float(backend.optimizer.state[named["2.first.weight"]]["step"]) == 5


def test_frobenius_decay_on_sharded_parameters_is_refused_before_any_work(tmp_path):
    from dist_lowrank.errors import ConfigError

    run, lowrank = load_train_config("configs/demo.yaml", ["run.backend=fsdp2", "lowrank.cuttlefish.frobenius_decay=0.1",
                                                           f"run.out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="frobenius_decay"):
        train(run, lowrank)
    assert not (tmp_path / "events.jsonl").exists()
