"""fairscale OSS + ShardedDataParallel on 2 gloo ranks vs plain torch in one process (computed in the same test).

One run of the worker (module fixture) is shared by the parity, state, partition and checkpoint tests; the user's
own script (examples/fairscale_cuttlefish.py) runs under the real `torchrun` against the one-process job.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.dist_harness import run_ranks
from tests.distributed.fairscale_workers import SAVE_AFTER, fairscale_all
from tests.distributed.switch_common import (PLAN_RANKS, POST_STEPS, PRE_STEPS, UNTOUCHED, fixed_input, global_batch,
                                             loss_fn, lr_decay, make_model)

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 45  # the example's config switches by step 40 at the latest


class _Factored(nn.Module):
    """x Bᵀ Aᵀ + b with the plugin's parameter names (first: B, second: A and the bias), written here in plain torch."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.first = nn.Linear(b.shape[1], b.shape[0], bias=False)
        self.second = nn.Linear(a.shape[1], a.shape[0])
        with torch.no_grad():
            self.first.weight.copy_(b)
            self.second.weight.copy_(a)
            self.second.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def plain_torch_run() -> dict:
    """The oracle, sharing no code with the plugin: the MLP in one process on the global batches with AdamW and
    LambdaLR; at the switch each planned layer is replaced by its truncated SVD (A = U√Σ, B = √ΣVᵀ, each component's
    sign so that the largest-|·| entry of U's column is positive) inside the same optimizer: the replaced
    parameters' state is dropped, the factors start fresh, everything else keeps its state and the schedule."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lr_decay)

    def run(steps: range) -> list[float]:
        losses = []
        for step in steps:
            optimizer.zero_grad()
            loss = loss_fn(model, global_batch(step))
            losses.append(float(loss.detach()))
            loss.backward()
            optimizer.step()
            scheduler.step()
        return losses

    pre = run(range(PRE_STEPS))
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    state = {n: {k: v.clone() for k, v in optimizer.state[params[n]].items()} for n in UNTOUCHED}
    with torch.no_grad():
        for name, r in PLAN_RANKS.items():
            index = int(name.split(".")[1])
            layer = model.net[index]
            u, sigma, vh = torch.linalg.svd(layer.weight.double(), full_matrices=False)
            u, sigma, vh = u[:, :r], sigma[:r], vh[:r]
            signs = torch.sign(u[u.abs().argmax(0), torch.arange(r)])
            a, b = (u * signs * sigma.sqrt()).float(), (sigma.sqrt()[:, None] * vh * signs[:, None]).float()
            for p in layer.parameters():
                optimizer.state.pop(p, None)
            model.net[index] = _Factored(a, b, layer.bias.detach())
    optimizer.param_groups[0]["params"] = list(model.parameters())
    with torch.no_grad():
        out = model(fixed_input())
    post = run(range(PRE_STEPS, PRE_STEPS + POST_STEPS))
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    loss_fn(model, global_batch(PRE_STEPS + POST_STEPS)).backward()
    grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
    return {"pre": pre, "post": post, "dense": dense, "state": state, "out": out, "final": final,
            "grad_norm": grad_norm}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_ranks(fairscale_all, args=(str(tmp_path_factory.mktemp("fairscale")),), timeout=200)


@pytest.fixture(scope="module")
def ranks(runs):
    return [r["switch"] for r in runs]


@pytest.fixture(scope="module")
def plain():
    return plain_torch_run()


def _mean(a: list[float], b: list[float]) -> torch.Tensor:
    return torch.tensor([(x + y) / 2 for x, y in zip(a, b)])


def test_losses_and_weights_match_plain_torch(ranks, plain):
    """Half batches on 2 ranks (gradients reduced to their owner, OSS step + broadcast) == one process on the
    global batch, before and after the switch; the replicas stay identical."""
    r0, r1 = ranks
    assert r0["wrapper"] == r1["wrapper"] == "ShardedDataParallel"
    assert torch.allclose(_mean(r0["losses_pre"], r1["losses_pre"]), torch.tensor(plain["pre"]), atol=1e-5)
    assert torch.allclose(_mean(r0["losses_post"], r1["losses_post"]), torch.tensor(plain["post"]), atol=1e-5)
    for r in ranks:
        for name, tensor in plain["dense"].items():
            assert torch.allclose(r["full_before"][name], tensor, atol=1e-6), name
        assert torch.allclose(r["out"], plain["out"], atol=1e-5)
    assert set(r0["final"]) == set(plain["final"])
    for name, tensor in r0["final"].items():
        assert torch.equal(tensor, r1["final"][name]), name
        assert torch.allclose(tensor, plain["final"][name], atol=1e-5), name
    assert r0["losses_post"][-1] < r0["losses_pre"][0]


def test_one_partition_and_each_state_on_its_owner(ranks):
    """Both ranks see one partition (before and after the rebuild), and every state lives only on its owner."""
    r0, r1 = ranks
    assert [(n, rep) for n, _, rep in r0["views"]] == [(n, True) for n in sorted(PLAN_RANKS)]
    for key in ("owners_before", "owners_after"):
        assert r0[key] == r1[key] and set(r0[key].values()) == {0, 1}
        owned = "owned_before" if key == "owners_before" else "owned_after"
        for rank, r in enumerate(ranks):
            assert set(r[owned]) <= {n for n, o in r[key].items() if o == rank}
    assert set(r0["owned_before"]) | set(r1["owned_before"]) == set(r0["owners_before"])  # all stepped 3 times
    assert not (set(r0["owned_before"]) & set(r1["owned_before"]))


def test_untouched_state_kept_bitwise_across_owner_change(ranks, plain):
    """Every untouched parameter's AdamW state, read from its owner before and from its (possibly new) owner after
    the switch, is equal bit for bit; at least one changed owner, so the move was exercised; the factors start
    fresh; the old parameters and OSS are released."""
    r0, r1 = ranks
    before, after = r0["owners_before"], r0["owners_after"]
    untouched = [n for n in before if n in after]
    assert sorted(untouched) == sorted(UNTOUCHED)
    moved = [n for n in untouched if before[n] != after[n]]
    assert moved, "the rebuilt partition moved no state: the test would not exercise the transfer"
    for name in untouched:
        old, new = ranks[before[name]]["owned_before"][name], ranks[after[name]]["owned_after"][name]
        assert set(old) == set(new) == {"step", "exp_avg", "exp_avg_sq"}, name
        for key in old:
            assert torch.equal(old[key], new[key]), (name, key)
        for key, value in plain["state"][name].items():
            assert torch.allclose(new[key], value, atol=1e-7, rtol=1e-5), (name, key)
    for r in ranks:
        assert r["measurements"]["moved_states"] == len(moved)
        assert r["measurements"]["moved_state_bytes"] == sum(2 * r0["final"][n].numel() * 4 for n in moved)
        assert not any(n in r["owned_after"] for n in r["factor_names"])
        assert r["released"]


def test_checkpoint_after_switch_resumes_the_same_run(ranks):
    """A checkpoint saved SAVE_AFTER steps after the switch, loaded into a fresh model built from its layout and
    param groups (with ShardedDDP's gradient buckets on, the OSS made by `oss_factory_from` from a torch AdamW
    factory), continues the run: same losses, weights, lr."""
    for r in ranks:
        assert r["resumed_buckets"] and r["resumed_inner"] == "AdamW"
        assert r["losses_resumed"] == r["losses_post"][SAVE_AFTER:]
        assert r["lr_resumed"] == r["lr_after"]
        for name, tensor in r["final"].items():
            assert torch.equal(tensor, r["final_resumed"][name]), name


def test_clip_grad_norm_is_global(ranks, plain):
    """`clip_grad_norm` (OSS's: each owner's gradient norms reduced over ranks) gives plain torch's global norm on
    every rank, although each rank holds only its owners' gradients."""
    r0, r1 = ranks
    assert r0["grad_norm"] == r1["grad_norm"]
    assert r0["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)


def test_bad_inputs_are_named(ranks):
    errors = ranks[0]["errors"]
    assert errors["not_oss"].startswith("optimizer: the factory returned a AdamW, not a fairscale.optim.OSS")
    assert errors["sdp_kwargs"].startswith("sdp_kwargs: the model is a ShardedDataParallel already")


def test_device_discipline(runs):
    """The device-discipline family (monitor, step, profiled switch, InRank growth past capacity) on this backend:
    no op meets tensors of two (virtual) devices, no collective gets a host tensor; the switched layers equal
    torch.linalg.svd's truncation, the growth keeps the spectrum (tests/distributed/test_device_discipline.py)."""
    from tests.distributed.device_workers import RANKS
    from tests.distributed.test_device_discipline import check_result

    first, second = (r["device"] for r in runs)
    for r in (first, second):
        check_result(r)
    for name in RANKS:
        assert torch.equal(first["effective"][name], second["effective"][name])


def test_users_script_under_torchrun(tmp_path):
    """examples/fairscale_cuttlefish.py under the real torchrun (2 ranks): one switch step and one set of ranks on
    both ranks, equal to the same job in one process (local backend, the global batch); losses follow it."""
    from dist_lowrank import attach
    from dist_lowrank.backends.local_backend import LocalBackend
    from examples.common import LOWRANK, mlp, train

    assert LOWRANK["cuttlefish"]["max_switch_step"] < STEPS  # the switch happens inside the run
    result = tmp_path / "result"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT") and not k.startswith("DIST_LOWRANK")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    proc = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
                             "examples/fairscale_cuttlefish.py", "--steps", str(STEPS), "--result", str(result)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    backend = LocalBackend(mlp(), lambda params: torch.optim.AdamW(params, lr=2e-3))  # while torchrun runs
    reference = train(backend, attach(backend, LOWRANK), steps=STEPS, batch=64)
    try:
        stdout, stderr = proc.communicate(timeout=200)
    finally:
        proc.kill()
    assert proc.returncode == 0, f"torchrun failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    r0, r1 = (json.loads(Path(f"{result}.rank{r}.json").read_text()) for r in (0, 1))
    assert r0["switch_step"] == r1["switch_step"] == reference["switch_step"] is not None
    assert r0["ranks"] == r1["ranks"] == reference["ranks"] and reference["ranks"]
    assert f"switched at step {reference['switch_step']}" in stdout
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert mean[:10] == pytest.approx(reference["losses"][:10], abs=1e-5)
    windows = [sum(mean[i:i + 15]) / 15 for i in range(0, STEPS, 15)]
    expected = [sum(reference["losses"][i:i + 15]) / 15 for i in range(0, STEPS, 15)]
    assert windows == pytest.approx(expected, abs=0.1)
    assert mean[-1] < 0.5 * mean[0]
