"""The engine a run config names, built around the task's model: the method's layers first (prepare_model),
on resume the checkpoint's layer shapes and param-group layout, and for DeepSpeed the ds_config the run's keys
imply. One job: turn (run config, task, lowrank section) into a Backend."""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from dist_lowrank.backends.base import Backend
from dist_lowrank.checkpoint.manifest import Manifest, apply_layout
from dist_lowrank.config import LowRankConfig
from dist_lowrank.methods import prepare_model
from dist_lowrank.train.recipe import optimizer_factory, scheduler_factory
from dist_lowrank.train.run_config import RunConfig
from dist_lowrank.train.tasks import Task


def deepspeed_config(run: RunConfig) -> dict[str, Any]:
    """The ds_config the run's keys imply: micro-batch, ZeRO stage (ZeRO-3 gathers every parameter each step:
    persistence threshold 0 so the model's small tensors are partitioned too), clipping inside engine.step."""
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": run.batch_size, "gradient_accumulation_steps": 1,
                              "zero_optimization": {"stage": run.zero_stage, "stage3_param_persistence_threshold": 0},
                              "steps_per_print": 10**9}
    if run.grad_clip > 0:
        config["gradient_clipping"] = run.grad_clip
    return config


def make_backend(run: RunConfig, task: Task, lowrank: LowRankConfig, comm_hook=None,
                 manifest: Optional[Manifest] = None) -> Backend:
    """The engine named in the run config, around the task's model (in the method's own layers where it has them); on resume
    with the checkpoint's layer shapes and param-group layout (groups, hyper-parameters) before the engine
    exists. AdamW and the lr schedule come from the run's recipe keys."""
    def model_fn() -> nn.Module:
        model = task.model_fn()
        model = prepare_model(model, lowrank)
        return apply_layout(model, manifest.layout) if manifest is not None else model

    optimizer = optimizer_factory(run)
    scheduler = scheduler_factory(run)
    groups = manifest.engine.get("param_groups") if manifest is not None else None
    if run.backend == "local":
        from dist_lowrank.backends.local_backend import LocalBackend

        return LocalBackend(model_fn(), optimizer, scheduler, param_groups=groups)
    if run.backend == "ddp":
        from dist_lowrank.backends.ddp_backend import DDPBackend

        return DDPBackend(model_fn(), optimizer, scheduler, comm_hook=comm_hook, param_groups=groups)
    if run.backend == "fairscale":
        from dist_lowrank.backends.fairscale_backend import FairscaleBackend, oss_factory_from

        return FairscaleBackend(model_fn(), oss_factory_from(optimizer), scheduler, param_groups=groups)
    if run.backend == "fsdp2":
        from dist_lowrank.backends.fsdp2_backend import FSDP2Backend, shard_each_layer

        return FSDP2Backend(model_fn, shard_each_layer, optimizer, scheduler, param_groups=groups)
    from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend

    ds_config = deepspeed_config(run)
    names = manifest.engine.get("group_names") if manifest is not None and not groups else None
    if manifest is not None and DeepSpeedBackend.needs_universal(manifest.engine):
        ds_config["checkpoint"] = {"load_universal": True}  # another world size: DeepSpeed's universal checkpoint
    return DeepSpeedBackend(model_fn(), ds_config, optimizer, scheduler, group_names=names, param_groups=groups)
