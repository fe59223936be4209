"""Param groups, a scheduler instance and gradient accumulation 2 through a switch (issue 13, items 3 and 4).

examples/param_groups_accumulation.py runs on 2 gloo ranks per backend (micro-batches of 16, accumulation 2:
64 samples per optimizer step); the oracle is plain torch in one process: the dense MLP trained by
torch.optim.AdamW with the same two groups on the same 64-sample batches, the LambdaLR schedule applied by
hand, `torch.linalg.svd` at the switch step (A = U√Σ, B = √ΣVᵀ), and AdamW continuing on the factorized model
built here (factors in the group of the weight they replace, with fresh state).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.dist_harness import run_ranks
from tests.distributed.param_group_workers import WATCHED, example_worker

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

STEPS, SWITCH, RANKS = 12, 6, {"2": 32, "4": 16}  # fixed strategy: ceil(0.125 * min(m, n)) after step 6


class Factorized(nn.Module):
    """second(first(x)): the factorized layer written out here (same parameter names as the plugin's)."""

    def __init__(self, dense: nn.Linear, rank: int) -> None:
        super().__init__()
        u, s, vh = torch.linalg.svd(dense.weight.detach().double(), full_matrices=False)
        root = s[:rank].sqrt()
        self.first = nn.Linear(dense.in_features, rank, bias=False)
        self.second = nn.Linear(rank, dense.out_features)
        with torch.no_grad():
            self.first.weight.copy_((root[:, None] * vh[:rank]).float())
            self.second.weight.copy_((u[:, :rank] * root).float())
            self.second.bias.copy_(dense.bias)

    def forward(self, x):
        return self.second(self.first(x))


def _groups(model: nn.Module) -> list[dict]:
    from examples.param_groups_accumulation import GROUPS

    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not n.endswith("bias")], "tag": "decay", **GROUPS["decay"]},
            {"params": [p for n, p in named if n.endswith("bias")], "tag": "no_decay", **GROUPS["no_decay"]}]


@pytest.fixture(scope="module")
def oracle() -> dict:
    """Plain torch, one process, the doubled (global) batch."""
    from examples.common import digits, mlp
    from examples.param_groups_accumulation import lr_decay, lr_inverse

    model = mlp()
    opt = torch.optim.AdamW(_groups(model))
    base = [g["lr"] for g in opt.param_groups]
    schedules = [lr_decay, lr_inverse]
    batches = digits(0, 1, batch=64)
    losses = []
    for step in range(1, STEPS + 1):
        for group, lr0, fn in zip(opt.param_groups, base, schedules):
            group["lr"] = lr0 * fn(step - 1)  # LambdaLR: the k-th optimizer step runs at lambda(k - 1)
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step == SWITCH:
            old_state = {n: opt.state[p] for n, p in model.named_parameters()}
            for name, rank in RANKS.items():
                model[int(name)] = Factorized(model[int(name)], rank)
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt = torch.optim.AdamW([{**h, "params": g["params"]} for h, g in zip(hyper, _groups(model))])
            for n, p in model.named_parameters():
                if n in old_state and not n.startswith(tuple(f"{k}." for k in RANKS)):
                    opt.state[p] = old_state[n]
    for group, lr0, fn in zip(opt.param_groups, base, schedules):
        group["lr"] = lr0 * fn(STEPS)  # what the next step would run at: a scheduler has stepped STEPS times
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {names[id(p)]: (g["lr"], g["weight_decay"], tuple(g["betas"]), g["tag"])
              for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    state = {n: opt.state[params[n]]["exp_avg_sq"].clone() for n in WATCHED}
    return {"losses": losses, "groups": groups, "state": state}


def check(results: list[dict], oracle: dict, backend: str) -> None:
    r0, r1 = results
    assert r0["switch_step"] == r1["switch_step"] == SWITCH
    assert r0["ranks"] == r1["ranks"] == RANKS
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert mean == pytest.approx(oracle["losses"], abs=1e-5), (mean, oracle["losses"])  # measured: <= 3e-7
    for r in (r0, r1):
        got = r["inspect"]
        assert got["same_scheduler"], "the user's scheduler instance drives the rebuilt optimizer"
        assert got["last_epoch"] == STEPS
        assert set(got["groups"]) == set(oracle["groups"])
        for name, (lr, wd, betas, tag) in oracle["groups"].items():
            glr, gwd, gbetas, gtag = got["groups"][name]
            assert (gwd, gbetas, gtag) == (wd, betas, tag), name
            assert glr == pytest.approx(lr, rel=1e-9), name
        for name in WATCHED:
            assert torch.allclose(got["state"][name], oracle["state"][name], rtol=1e-3, atol=1e-12), name
        for name, step in got["steps"].items():  # factors (and the switched layers' biases) start at step 0
            fresh = name.startswith(("2.", "4."))
            assert step == (STEPS - SWITCH if fresh else STEPS), (name, step)
        # torch keeps one group per source group; DeepSpeed adds a companion group per source group
        assert got["n_groups"] == (4 if backend.startswith("zero") else 2)


def expected_hyper(name: str, steps: int) -> tuple:
    """The rule the user's groups follow, with the lr the schedule reaches after `steps` scheduler steps."""
    from examples.param_groups_accumulation import GROUPS, lr_decay, lr_inverse

    tag, fn = ("no_decay", lr_inverse) if name.endswith("bias") else ("decay", lr_decay)
    group = GROUPS[tag]
    return group["lr"] * fn(steps), group["weight_decay"], tuple(group["betas"]), tag


def check_growth(growth: dict, backend: str) -> None:
    """InRank growth past capacity at step 10 with the two groups: members and hyper-parameters by the rule,
    lr where the schedule is, U/V keep their Adam step (and group: no companion), untouched state bit for bit."""
    kind, ranks, capacities = growth["plan"]
    assert kind == "grow" and capacities, growth["plan"]
    assert {"2.u", "2.v", "4.u", "4.v"} <= set(growth["groups"])
    for name, (lr, wd, betas, tag) in growth["groups"].items():
        elr, ewd, ebetas, etag = expected_hyper(name, 10)
        assert (wd, betas, tag) == (ewd, ebetas, etag) and lr == pytest.approx(elr, rel=1e-9), name
    assert set(growth["steps"].values()) == {10.0}, growth["steps"]
    assert growth["same_scheduler"] and growth["last_epoch"] == 10
    assert growth["n_groups"] == 2 and growth["untouched_bitwise"]


def check_resume(resume: dict, n_groups: int) -> None:
    """The engine rebuilt from the manifest's layout has the same groups (companions included), steps and
    schedule position, drives the user's new scheduler, and trains on exactly as the uninterrupted engine."""
    assert resume["groups"][0] == resume["groups"][1]
    assert resume["steps"][0] == resume["steps"][1]
    assert resume["last_epoch"] == (STEPS, STEPS)
    assert resume["same_scheduler"] and resume["n_groups"] == n_groups
    assert resume["losses"][0] == resume["losses"][1]


# Growth and resume ride on some of the runs (same processes, no second start-up). Growth: ZeRO-2 (sharded
# optimizer state; ZeRO-1 runs the same DeepSpeedBackend code, ZeRO-3 differs only in the per-parameter state
# getters the switch already exercises) and DDP (replicated). Resume: ZeRO-2, ZeRO-3 (DeepSpeed's own checkpoint
# per stage) and FSDP2 (DCP); DDP's is LocalBackend's code, tests/unit/test_param_groups_resume.py.
@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "zero1", "zero2", "zero3"])
def test_groups_scheduler_and_accumulation_through_a_switch(backend, oracle, tmp_path):
    growth = backend in ("ddp", "zero2")
    resume = str(tmp_path) if backend in ("fsdp2", "zero2", "zero3") else ""
    results = run_ranks(example_worker, args=(backend, STEPS, resume, growth), timeout=300)
    check(results, oracle, backend)
    for r in results:
        if growth:
            check_growth(r["growth"], backend)
        if resume:
            check_resume(r["resume"], 4 if backend.startswith("zero") else 2)


@pytest.mark.parametrize("fault,backend,phase", [
    ("gather:raise:1", "fsdp2", "gathering 2, 4"),
    ("rebuild:raise:1", "zero2", "engine rebuild (module surgery, client optimizer)"),
    ("transplant:raise:1", "ddp", "switch rebuild (module surgery, optimizer transplant)")])
def test_a_failure_on_one_rank_mid_rebuild_ends_every_rank_with_the_same_named_error(fault, backend, phase):
    """Item 9: rank 1 raises after its share of FSDP2's layer gathers (full_tensor), in the engine rebuild
    (ZeRO-2, before the new deepspeed.initialize) or in the optimizer transplant (DDP, new optimizer built,
    state not yet installed). Neither rank is left in a
    collective: both end, well within the harness timeout, with the same RemoteRankError naming rank 1 and
    its cause — not a gloo "Connection closed by peer"."""
    results = run_ranks(example_worker, args=(backend, STEPS), timeout=180, expect_errors=True,
                        env={"DIST_LOWRANK_FAULT": fault})
    point = fault.split(":")[0]
    expected = f"RemoteRankError: {phase} failed on rank(s) [1]: InjectedFault: injected fault at {point} on rank 1"
    for result in results:
        assert isinstance(result, tuple) and result[0] == "error", result
        assert result[1].splitlines()[0] == expected, result[1][:500]
        assert "Connection closed" not in result[1]
