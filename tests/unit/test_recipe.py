"""The CLI's training recipe (AdamW betas, warm-up + cosine, clipping, decay groups), the run keys that set it,
`train_s` on evaluations, and the out-of-domain validation loss on the King James Bible."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_lowrank.backends.local_backend import LocalBackend
from dist_lowrank.errors import ConfigError
from dist_lowrank.train.config_file import load_train_config
from dist_lowrank.train.loop import train
from dist_lowrank.train.recipe import clip_gradients, lr_factor, optimizer_factory, scheduler_factory
from dist_lowrank.train.run_config import RunConfig

pytestmark = pytest.mark.unit


def nanogpt_lr(it: int, lr: float, warmup: int, decay_iters: int, min_lr: float) -> float:
    """nanoGPT's get_lr (train.py), written out independently of the code under test."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / (decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def _run(**kw) -> RunConfig:
    return load_train_config({"run": kw})[0]


def test_cosine_schedule_matches_nanogpt_through_a_real_scheduler():
    run = _run(steps=50, lr=0.02, lr_schedule="cosine", warmup_steps=5, min_lr=0.002)
    w = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([w], lr=run.lr)
    scheduler = scheduler_factory(run)(optimizer)
    seen = []
    for _ in range(run.steps):  # the lr each optimizer step uses, as the loop steps the scheduler
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [nanogpt_lr(it, 0.02, 5, 50, 0.002) for it in range(50)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[0] == pytest.approx(0.02 / 6) and seen[5] == pytest.approx(0.02)  # warm-up ends at full lr
    assert seen[-1] > 0.002 and seen[-1] == pytest.approx(0.002, rel=0.02)  # last step just above the floor
    assert seen[27] == pytest.approx(0.002 + 0.5 * (1 + math.cos(math.pi * 22 / 45)) * 0.018)


def test_constant_schedule_with_warmup_and_without():
    run = _run(steps=20, lr=0.01, warmup_steps=4)
    assert [lr_factor(run, it) for it in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert scheduler_factory(_run(steps=20)) is None  # old configs: no scheduler at all (checkpoints unchanged)


def test_optimizer_betas_and_two_decay_groups_only_with_weight_decay():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    opt = optimizer_factory(_run(beta1=0.8, beta2=0.99, weight_decay=0.1))(list(model.parameters()))
    assert [g["betas"] for g in opt.param_groups] == [(0.8, 0.99)] * 2
    decay, plain = opt.param_groups
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in plain["params"]} == {id(model[1].weight), id(model[1].bias), id(model[2].bias)}
    # a rebuild hands the layout's group dicts back: kept as given
    again = optimizer_factory(_run(weight_decay=0.1))([{"params": [model[2].bias], "weight_decay": 0.0}])
    assert len(again.param_groups) == 1 and again.param_groups[0]["weight_decay"] == 0.0
    assert len(optimizer_factory(_run())(list(model.parameters())).param_groups) == 1


def test_clip_gradients_matches_plain_torch_norm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 2))
    backend = LocalBackend(model, lambda p: torch.optim.SGD(p, lr=0.1))
    loss = model(torch.randn(5, 6)).pow(2).sum() * 10
    backend.backward(loss)
    grads = [p.grad.clone() for p in model.parameters()]
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    assert norm > 1.0
    reported = clip_gradients(backend, 1.0)
    assert float(reported) == pytest.approx(norm, rel=1e-6)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(p.grad, g / (norm + 1e-6), rtol=1e-6)
    assert clip_gradients(backend, 0.0) is None


@pytest.mark.parametrize("override, key", [
    ("run.lr_schedule=linear", "run.lr_schedule"), ("run.warmup_steps=-1", "run.warmup_steps"),
    ("run.min_lr=0.5", "run.min_lr"), ("run.grad_clip=-0.1", "run.grad_clip"), ("run.beta2=1.0", "run.beta2"),
    ("run.beta1=-0.1", "run.beta1"), ("run.ood_eval=3", "run.ood_eval"), ("run.warmup_steps=2.5", "run.warmup_steps"),
])
def test_recipe_key_errors_are_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_train_config({"run": {"lr": 0.01}}, [override])
    message = str(err.value)
    assert message.startswith(key + ":") and "\n" not in message


def _windows(ids: torch.Tensor, starts: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = torch.stack([ids[s: s + t + 1] for s in starts.tolist()])
    return chunk[:, :-1], chunk[:, 1:]


def test_ood_val_loss_is_cross_entropy_on_bible_windows():
    import importlib.util

    from dist_lowrank.data.bible import fold_to_vocab, kjv_path, load_kjv
    from dist_lowrank.data.shakespeare import CharTokenizer, load_plays
    from dist_lowrank.train.tasks import OOD_SEED, shakespeare_gpt

    location = Path(list(importlib.util.find_spec("bible").submodule_search_locations)[0])
    assert kjv_path() == location / "data" / "kjv.jsonl"
    text = load_kjv()
    assert text.startswith("In the beginning God created the heaven and the earth.\nAnd the earth was")
    assert text.count("\n") == 31102 and len(text) > 4_000_000
    assert fold_to_vocab("café ﬁne ☃", "cafe fin") == "cafe fine  "

    run = _run(task="shakespeare_gpt", block_size=16, n_layer=1, n_head=2, n_embd=16, eval_samples=20)
    torch.manual_seed(0)
    task = shakespeare_gpt(run)
    model = task.model_fn()
    metrics = task.evaluate(model)
    # reference: tokenizer and windows rebuilt here, loss by plain torch over all windows at once
    train_text, val_text = load_plays()
    tok = CharTokenizer(train_text + val_text)
    lines = [json.loads(line)["text"] for line in kjv_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = tok.encode("\n".join(lines))
    starts = torch.randint(0, ids.numel() - 17, (20,), generator=torch.Generator().manual_seed(OOD_SEED))
    x, y = _windows(ids, starts, 16)
    with torch.no_grad():
        logits = model.eval()(x)
    expected = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    assert metrics["ood_val_loss"] == pytest.approx(expected, rel=1e-5)
    val_ids = tok.encode(val_text)
    vstarts = torch.randint(0, val_ids.numel() - 17, (20,), generator=torch.Generator().manual_seed(7))
    vx, vy = _windows(val_ids, vstarts, 16)
    with torch.no_grad():
        vlogits = model(vx)
    expected_val = float(F.cross_entropy(vlogits.reshape(-1, vlogits.shape[-1]), vy.reshape(-1)))
    assert metrics["val_loss"] == pytest.approx(expected_val, rel=1e-5)  # computed as before
    assert metrics["val_loss"] != pytest.approx(metrics["ood_val_loss"], rel=1e-4)  # another set of windows
    off = shakespeare_gpt(_run(task="shakespeare_gpt", block_size=16, n_layer=1, n_head=2, n_embd=16,
                               eval_samples=20, ood_eval=False))
    assert set(off.evaluate(model)) == {"val_loss"}


@pytest.mark.timeout(120)
def test_recipe_run_logs_train_seconds_and_ood_loss(tmp_path):
    steps = 8
    run, lowrank = load_train_config({"run": {
        "task": "shakespeare_gpt", "steps": steps, "batch_size": 4, "block_size": 16, "n_layer": 1, "n_head": 2,
        "n_embd": 16, "eval_every": 4, "eval_samples": 16, "log_every": 4, "out_dir": str(tmp_path),
        "lr": 0.01, "lr_schedule": "cosine", "warmup_steps": 2, "min_lr": 0.001, "grad_clip": 0.5,
        "beta2": 0.99, "weight_decay": 0.1}, "lowrank": {"strategy": "none"}})
    summary = train(run, lowrank)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [4, 8]
    assert 0 < evals[0]["train_s"] < evals[1]["train_s"]
    assert all("ood_val_loss" in e and math.isfinite(e["ood_val_loss"]) for e in evals)
    final = summary["final_eval"]
    assert final["train_s"] == evals[1]["train_s"] and final["ood_val_loss"] == evals[1]["ood_val_loss"]
    trained = sum(e["step_time"] * e["window_steps"] for e in events if e["event"] == "train")
    assert final["train_s"] >= trained * 0.5  # the steps' time is in it (step_time leaves a window's first out)
    assert final["train_s"] < summary["wall_seconds"]
