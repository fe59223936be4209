"""The CLI's training recipe on 2 gloo ranks: DDP and DeepSpeed ZeRO-2 with warm-up + cosine, weight-decay
groups and gradient clipping, through a fixed-strategy switch after step 4 (of 8), and a ZeRO-2 resume.

Oracle (plain torch, one process, the 8-window global batch): torch.optim.AdamW with the decay / no-decay
groups, the lr set by hand from nanoGPT's formula, the global norm summed by hand and the clip applied by hand.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_lowrank.checkpoint.store import step_dir
from tests.dist_harness import run_ranks
from tests.distributed.recipe_workers import RUN, STEPS, SWITCH_AFTER, config, recipe_worker, resume_worker

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]


def schedule_lr(step: int) -> float:
    """nanoGPT's get_lr for 1-based optimizer step `step` (it = step - 1)."""
    it, lr, warm, lo = step - 1, RUN["lr"], RUN["warmup_steps"], RUN["min_lr"]
    if it < warm:
        return lr * (it + 1) / (warm + 1)
    return lo + 0.5 * (1 + math.cos(math.pi * (it - warm) / (STEPS - warm))) * (lr - lo)


@pytest.fixture(scope="module")
def oracle() -> dict:
    from dist_lowrank.train.tasks import build_task

    run, _ = config("local", 1, batch_size=2 * RUN["batch_size"])  # same draws: the two ranks' slices together
    torch.manual_seed(run.seed)
    task = build_task(run)
    model = task.model_fn()
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}],
                            lr=RUN["lr"], betas=(0.9, 0.99))
    batches = task.batches(0, 1)
    norms = []
    for step in range(1, SWITCH_AFTER + 1):
        x, y = next(batches)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for _, p in named))
        norms.append(norm)
        for _, p in named:
            p.grad.mul_(min(1.0, RUN["grad_clip"] / (norm + 1e-6)))
        for group in opt.param_groups:
            group["lr"] = schedule_lr(step)
        opt.step()
    return {"norms": norms, "params": {n: p.detach().clone() for n, p in named}}


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_schedule_and_clipping_through_a_switch(backend, oracle):
    results = run_ranks(recipe_worker, world=2, timeout=180, args=(backend,))
    out = results[0]
    assert out["switch"] == SWITCH_AFTER
    # before the switch: the global norm before clipping is plain torch's, the clip is active, the weights agree
    assert all(n > RUN["grad_clip"] * 2 for n in oracle["norms"])
    assert out["norms"][:SWITCH_AFTER] == pytest.approx(oracle["norms"], rel=1e-4)
    assert results[1]["norms"] == pytest.approx(out["norms"], rel=1e-6)  # every rank clipped by the same norm
    for name, ref in oracle["params"].items():
        got = out["before_switch"][name]
        if name.endswith("c_attn.bias"):  # the key bias: zero gradient in exact arithmetic (softmax ignores a
            keep = torch.ones_like(ref, dtype=torch.bool)  # per-query constant), so Adam turns rounding noise
            keep[RUN["n_embd"]:2 * RUN["n_embd"]] = False  # into +-lr steps: not comparable between engines
            got, ref = got[keep], ref[keep]
        assert torch.allclose(got, ref, atol=2e-5, rtol=1e-4), (name, float((got - ref).abs().max()))
    # every step, every group (old, and the factor groups made at the switch): lr = the schedule's value
    for step, groups in enumerate(out["lrs"], start=1):
        for group in groups:
            assert group["lr"] == pytest.approx(schedule_lr(step), rel=1e-9), (step, group["names"][:2])
    after = out["lrs"][SWITCH_AFTER]  # step 5: the first step of the rebuilt optimizer
    factors = {n for g in after for n in g["names"] if ".first." in n or ".second." in n}
    assert factors, "the switch made no factors"
    decay = {n for g in after if g["weight_decay"] == 0.1 for n in g["names"]}
    plain = {n for g in after if g["weight_decay"] == 0.0 for n in g["names"]}
    assert {n for n in factors if n.endswith("weight")} <= decay and {n for n in factors if n.endswith("bias")} <= plain
    assert all(n.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")) for n in plain)
    assert len(after) == (4 if backend == "zero2" else 2)  # ZeRO: a companion group per source group


@pytest.mark.slow
def test_two_groups_survive_a_zero2_resume_after_the_switch(tmp_path):
    whole = run_ranks(resume_worker, world=2, timeout=180, args=(str(tmp_path / "a"), "never"))[0]
    step6 = step_dir(tmp_path / "a" / "checkpoints", 6)
    resumed = run_ranks(resume_worker, world=2, timeout=180, args=(str(tmp_path / "b"), str(step6)))[0]
    assert whole["switch_step"] == resumed["switch_step"] == SWITCH_AFTER

    def meta(root: Path) -> list[dict]:
        return json.loads((step_dir(root / "checkpoints", 8) / "manifest.json").read_text())["engine"]["param_groups"]

    a, b = meta(tmp_path / "a"), meta(tmp_path / "b")
    assert [g["names"] for g in a] == [g["names"] for g in b] and len(a) == 4
    for ga, gb in zip(a, b):
        assert gb["hyper"]["weight_decay"] == ga["hyper"]["weight_decay"]
        assert gb["hyper"]["lr"] == pytest.approx(ga["hyper"]["lr"], rel=1e-12)
        assert gb["hyper"]["lr"] == pytest.approx(schedule_lr(STEPS + 1), rel=1e-9)  # what step 9 would use
    assert [g["hyper"]["weight_decay"] for g in a] == [0.1, 0.0, 0.1, 0.0]
    wa = torch.load(tmp_path / "a" / "model_fp32.pt")
    wb = torch.load(tmp_path / "b" / "model_fp32.pt")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-6, rtol=1e-5), name
    assert resumed["final_eval"]["val_loss"] == pytest.approx(whole["final_eval"]["val_loss"], rel=1e-5)
    assert resumed["final_eval"]["train_s"] > 0
