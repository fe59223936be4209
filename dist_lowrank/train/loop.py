"""The training loop of `dist-lowrank train`, the same for every backend.

The loop owns data, loss and evaluation; the backend owns backward/step and resharding; the controller
decides when ranks change; telemetry.session (shared with the library API) counts, times and logs.
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from dist_lowrank.backends.base import Backend
from dist_lowrank.checkpoint.manifest import Manifest, apply_layout
from dist_lowrank.config import LowRankConfig, config_to_dict
from dist_lowrank.controller import LowRankController
from dist_lowrank.gc_freeze import startup_objects_frozen
from dist_lowrank.methods import check_run, prepare_model
from dist_lowrank.surgery import count_parameters
from dist_lowrank.telemetry.comm import CommCounter
from dist_lowrank.telemetry.params import parameter_counts
from dist_lowrank.telemetry.session import RunTelemetry, rank_world
from dist_lowrank.train.checkpointing import export_fp32, find_resume, load_checkpoint, save_checkpoint
from dist_lowrank.train.run_config import RunConfig
from dist_lowrank.train.tasks import Task, build_task


def comm_model_name(run: RunConfig) -> Optional[str]:
    """The analytic communication model that describes this run's backend (None: nothing communicated)."""
    return {"local": None, "ddp": "ddp", "fsdp2": "fsdp2"}.get(run.backend, f"zero{run.zero_stage}")


def lr_factor(run: RunConfig, it: int) -> float:
    """The schedule's multiplier of run.lr for optimizer step `it` (0-based; step s of the loop is it = s-1),
    nanoGPT's recipe: linear warm-up (it+1)/(warmup_steps+1), then constant 1 or a cosine from 1 at
    it = warmup_steps down to min_lr/lr at it = steps (so the last step is just above the floor).

    A multiplier (not an absolute lr) so that every param group, factor groups added at a switch included,
    follows the same curve from its own base lr."""
    warm = run.warmup_steps
    if it < warm:
        return (it + 1) / (warm + 1)
    if run.lr_schedule == "constant":
        return 1.0
    floor = run.min_lr / run.lr
    ratio = min(1.0, (it - warm) / max(1, run.steps - warm))
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1.0 - floor)


def scheduler_factory(run: RunConfig) -> Optional[Callable[[torch.optim.Optimizer], Any]]:
    """optimizer -> LambdaLR(lr_factor), or None for a constant lr without warm-up (old configs: no scheduler,
    so their checkpoints and steps are what they were). A factory, not an instance: every backend binds it to
    its first optimizer and re-binds the same instance (its step count, one lambda per group) at a rebuild."""
    if run.lr_schedule == "constant" and run.warmup_steps == 0:
        return None
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, run))


def _stored_shape(param: torch.Tensor) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # a ZeRO-3 partitioned parameter reports shape (0,)


def optimizer_factory(run: RunConfig) -> Callable[[Iterable[Any]], torch.optim.Optimizer]:
    """params -> AdamW(lr, betas, weight_decay). With weight_decay > 0, nanoGPT's two groups: decay for >=2-D
    parameters (matrices, embeddings; factors made at a switch join their layer's weight, so the decay group),
    none for biases and norms. Called again at a rebuild with the layout's group dicts, which it keeps as given."""
    def build(params: Iterable[Any]) -> torch.optim.Optimizer:
        params = list(params)
        kwargs = {"lr": run.lr, "betas": (run.beta1, run.beta2), "weight_decay": run.weight_decay}
        if run.weight_decay > 0 and params and not isinstance(params[0], dict):
            decay = [p for p in params if len(_stored_shape(p)) >= 2]
            plain = [p for p in params if len(_stored_shape(p)) < 2]
            groups = [{"params": decay}] if decay else []
            groups += [{"params": plain, "weight_decay": 0.0}] if plain else []
            return torch.optim.AdamW(groups, **kwargs)
        return torch.optim.AdamW(params, **kwargs)
    return build


def clip_gradients(backend: Backend, max_norm: float) -> Optional[torch.Tensor]:
    """Clip the global gradient norm of the model's parameters to max_norm (DDP: gradients are already
    averaged; FSDP2: the norm of the DTensor shards is reduced over ranks, torchtitan's way); returns the norm
    before clipping as a device tensor (no host sync per step), None when off. DeepSpeed clips inside
    engine.step (ds_config `gradient_clipping`), so nothing here."""
    if max_norm <= 0 or backend.name == "deepspeed":
        return None
    params = [p for p in backend.unwrapped_model().parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # a DTensor (Partial over the shards): the global norm on every rank
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def make_backend(run: RunConfig, task: Task, lowrank: LowRankConfig, comm_hook=None,
                 manifest: Optional[Manifest] = None) -> Backend:
    """The engine named in the run config, around the task's model (in InRank form for InRank); on resume
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
    if run.backend == "fsdp2":
        from dist_lowrank.backends.fsdp2_backend import FSDP2Backend, shard_each_layer

        return FSDP2Backend(model_fn, shard_each_layer, optimizer, scheduler, param_groups=groups)
    from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend

    ds_config = {"train_micro_batch_size_per_gpu": run.batch_size, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": run.zero_stage, "stage3_param_persistence_threshold": 0},
                 "steps_per_print": 10**9}
    if run.grad_clip > 0:
        ds_config["gradient_clipping"] = run.grad_clip
    names = manifest.engine.get("group_names") if manifest is not None and not groups else None
    if manifest is not None and DeepSpeedBackend.needs_universal(manifest.engine):
        ds_config["checkpoint"] = {"load_universal": True}  # another world size: DeepSpeed's universal checkpoint
    return DeepSpeedBackend(model_fn(), ds_config, optimizer, scheduler, group_names=names, param_groups=groups)


def train(run: RunConfig, lowrank: LowRankConfig) -> dict[str, Any]:
    """Train for run.steps optimizer steps; return (and on rank 0 write) the run summary."""
    with startup_objects_frozen(run.backend):  # before any model: keeps the switch's gc pass short
        return _train(run, lowrank)


def _train(run: RunConfig, lowrank: LowRankConfig) -> dict[str, Any]:
    rank, world = rank_world()
    check_run(lowrank, sharded_parameters=run.backend == "fsdp2" or (run.backend == "deepspeed" and run.zero_stage == 3))
    if run.deterministic:
        torch.use_deterministic_algorithms(True)
    resume = find_resume(run, lowrank)  # the manifest is read before any model is built
    manifest = resume[1] if resume else None
    start_step = manifest.step if manifest else 0
    torch.manual_seed(run.seed)
    task = build_task(run)
    params_full = parameter_counts(task.model_fn())
    counter = CommCounter().install()  # before DeepSpeed builds its comm backend
    try:  # a run that fails (bad checkpoint, config) leaves torch.distributed as it found it
        backend = make_backend(run, task, lowrank, comm_hook=counter.ddp_hook(), manifest=manifest)
        if resume:
            load_checkpoint(backend, *resume)
        telemetry = RunTelemetry(run.out_dir, run.log_every, comm_model_name(run),
                                 samples_per_step=run.batch_size * world,
                                 tokens_per_sample=task.tokens_per_sample, counter=counter,
                                 resume_step=start_step if resume else None)
        telemetry.summary_extra = {"task": run.task, "backend": run.backend, "strategy": lowrank.strategy,
                                   "steps": run.steps}
        telemetry.switch_step = manifest.switch_step if manifest else None
        telemetry.begin(backend.unwrapped_model, {"run": vars(run), "lowrank": config_to_dict(lowrank),
                                                  "resumed_from": str(resume[0]) if resume else None},
                        step=start_step, phase=manifest.phase if manifest else "full", params_full=params_full)
        steps_per_epoch = max(1, task.samples_per_epoch // (run.batch_size * world))
        controller: Optional[LowRankController] = None
        if lowrank.strategy != "none":
            controller = LowRankController(backend, lowrank, steps_per_epoch=steps_per_epoch, telemetry=telemetry,
                                           resume_state=manifest.controller if manifest else None)
            if not manifest:
                controller.start()
        # engine set-up (DeepSpeed broadcasts the model) and the init estimate are not training traffic
        telemetry.ready()
        batches = task.batches(rank, world)
        for _ in range(start_step):  # the data order is a function of the step: skip what was trained
            next(batches)

        def checkpoint(step: int) -> None:
            with counter.pause():
                path = save_checkpoint(run, lowrank, backend, controller.state_dict() if controller else None, step,
                                       telemetry.phase, telemetry.switch_step)
            telemetry.log({"event": "checkpoint", "step": step, "path": str(path)})
        show_bar = rank == 0 and sys.stderr.isatty() and not os.environ.get("CI")
        from tqdm import tqdm

        bar = tqdm(total=run.steps, disable=not show_bar, desc="train", dynamic_ncols=True)
        evals: list[dict[str, Any]] = []
        bar.update(start_step)
        for step in range(start_step + 1, run.steps + 1):
            telemetry.restart_clock()  # evaluation and checkpoints between steps are not step time
            batch = next(batches)
            context = controller.record_shapes() if controller else nullcontext()
            with context:
                loss = task.loss_fn(backend.model, batch)
            if controller:
                loss = controller.regularize(loss)  # the method's penalty, where the engine owns the gradients
            backend.backward(loss)
            if controller:
                controller.after_backward()
            clip_gradients(backend, run.grad_clip)  # the gradient the step uses, decay term included
            backend.step()
            loss_value = float(loss.detach())
            if controller:  # records the step's traffic and time, then decides (its own traffic is not counted)
                plan = controller.after_step(step, loss_value)
            else:
                telemetry.end_step(step, loss_value)
                plan = None
                telemetry.after_controller(step, None)
            if step == run.steps and telemetry.window.steps:
                telemetry.flush(step)  # the last step is always logged
            if plan is not None and plan.kind == "switch" and rank == 0:
                tqdm.write(f"[step {step}] switched {len(plan.ranks)} layers to low rank; "
                           f"params {params_full['params']:,} -> {count_parameters(backend.unwrapped_model()):,}")
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if (run.eval_every and step % run.eval_every == 0) or step == run.steps:
                metrics = task.evaluate(backend.unwrapped_model())
                # train_s: seconds of training steps (switch included; no evaluation, no checkpoints) so far
                evals.append({"step": step, **metrics, "train_s": telemetry.train_seconds})
                telemetry.log({"event": "eval", **evals[-1]})
                if rank == 0:
                    tqdm.write(f"[step {step}] " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            if run.checkpoint_every and (step % run.checkpoint_every == 0 or step == run.steps):
                checkpoint(step)
        bar.close()
        if run.export_fp32:
            with counter.pause():
                export_fp32(backend, Path(run.out_dir))
        summary = telemetry.close(report=False, final_eval=evals[-1] if evals else {},
                                  ranks=dict(controller.ranks) if controller else {},
                                  skipped_nonfinite_steps=controller.skipped_steps if controller else 0)
    finally:
        counter.uninstall()
    if rank == 0:
        from dist_lowrank.telemetry.report import render_markdown, write_report

        print(render_markdown(write_report(run.out_dir)), end="")
    return summary
