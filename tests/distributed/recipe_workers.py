"""Rank functions for tests/distributed/test_recipe.py (module level for the spawn harness): the CLI's recipe
(make_backend's AdamW + LambdaLR factory, clip_gradients / DeepSpeed's gradient_clipping) through a fixed switch."""
from __future__ import annotations

from typing import Any

import torch

STEPS, SWITCH_AFTER = 8, 4
RUN = {"task": "shakespeare_gpt", "steps": STEPS, "batch_size": 4, "block_size": 16, "n_layer": 1, "n_head": 2,
       "n_embd": 32, "lr": 0.01, "lr_schedule": "cosine", "warmup_steps": 2, "min_lr": 0.001, "grad_clip": 0.3,
       "beta2": 0.99, "weight_decay": 0.1, "eval_samples": 16, "eval_every": 0, "ood_eval": False, "log_every": 2, "seed": 0}
LOWRANK = {"strategy": "fixed", "target_modules": ["mlp.c_fc", "mlp.c_proj"],
           "fixed": {"ratio": 0.25, "warmup_steps": SWITCH_AFTER}, "monitor": {"cadence_steps": SWITCH_AFTER, "steps": 4},
           "switch": {"profile_layers": False}}


def config(backend: str, world: int, **extra: Any):
    from dist_lowrank.train.config_file import load_train_config

    run = {**RUN, "backend": "deepspeed" if backend == "zero2" else backend, "zero_stage": 2, "world_size": world,
           **extra}
    return load_train_config({"run": run, "lowrank": LOWRANK})


def _groups(backend) -> list[dict]:
    """Per param group of the optimizer the engine steps: member names (the layout), lr, weight_decay."""
    opt = backend.optimizer
    opt = getattr(opt, "optimizer", opt)  # DeepSpeed: the client torch optimizer under ZeRO
    return [{"names": list(layout.names), "lr": float(group["lr"]), "weight_decay": float(group["weight_decay"])}
            for layout, group in zip(backend.layout.groups, opt.param_groups)]


def recipe_worker(rank: int, world: int, backend_name: str) -> dict:
    """The loop's step sequence on make_backend's engine: per step the lr of every group (before the step),
    the pre-clip global grad norm, and the parameters right before the switch."""
    from dist_lowrank.controller import LowRankController
    from dist_lowrank.train.engine import make_backend
    from dist_lowrank.train.recipe import clip_gradients
    from dist_lowrank.train.tasks import build_task

    run, lowrank = config(backend_name, world)
    torch.manual_seed(run.seed)
    task = build_task(run)
    backend = make_backend(run, task, lowrank)
    controller = LowRankController(backend, lowrank, steps_per_epoch=100)
    controller.start()
    batches = task.batches(rank, world)
    out: dict[str, Any] = {"lrs": [], "norms": [], "switch": None, "before_switch": None}
    for step in range(1, run.steps + 1):
        out["lrs"].append(_groups(backend))
        loss = task.loss_fn(backend.model, next(batches))
        backend.backward(loss)
        norm = clip_gradients(backend, run.grad_clip)
        backend.step()
        if norm is None:  # DeepSpeed clipped inside engine.step; this is the norm it measured before clipping
            norm = backend.engine.get_global_grad_norm()
        out["norms"].append(float(norm))
        params = {n: p.detach().clone() for n, p in backend.unwrapped_model().named_parameters()}
        plan = controller.after_step(step, float(loss.detach()))
        if plan is not None and plan.kind == "switch":
            out["switch"], out["before_switch"] = step, params
    return out if rank == 0 else {"norms": out["norms"]}


def resume_worker(rank: int, world: int, root: str, resume: str) -> dict:
    """dist_lowrank.train.loop.train itself on DeepSpeed ZeRO-2 (two decay groups, companions after the switch),
    checkpointing every 6 steps and exporting fp32; `resume`: "never" or a checkpoint directory."""
    from dist_lowrank.train.loop import train

    run, lowrank = config("zero2", world, out_dir=root, checkpoint_every=6, keep_checkpoints=0, resume=resume,
                          export_fp32=True)
    return train(run, lowrank)
