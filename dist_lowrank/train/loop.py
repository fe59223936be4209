"""The training loop of `dist-lowrank train`, the same for every backend.

The loop owns data, loss and evaluation; the backend (built by train/engine.py, with the recipe of
train/recipe.py) owns backward/step and resharding; the controller decides when shapes change;
telemetry.session (shared with the library API) counts, times and logs.
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch

from dist_lowrank.config import LowRankConfig, config_to_dict
from dist_lowrank.api import start_controller
from dist_lowrank.gc_freeze import startup_objects_frozen
from dist_lowrank.methods import check_run
from dist_lowrank.surgery import count_parameters
from dist_lowrank.telemetry.comm import CommCounter
from dist_lowrank.telemetry.params import parameter_counts
from dist_lowrank.telemetry.session import RunTelemetry, rank_world
from dist_lowrank.train.checkpointing import export_fp32, find_resume, load_checkpoint, save_checkpoint
from dist_lowrank.train.engine import make_backend
from dist_lowrank.train.recipe import clip_gradients
from dist_lowrank.train.run_config import RunConfig
from dist_lowrank.train.tasks import build_task


def comm_model_name(run: RunConfig) -> Optional[str]:
    """The analytic communication model that describes this run's backend (None: nothing communicated)."""
    return {"local": None, "ddp": "ddp", "fsdp2": "fsdp2", "fairscale": None}.get(run.backend, f"zero{run.zero_stage}")


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
        # the library's path: engine set-up and the init estimate are not training traffic
        controller = start_controller(backend, lowrank, steps_per_epoch, telemetry,
                                      resume_state=manifest.controller if manifest else None)
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
                task_loss = task.loss_fn(backend.model, batch)
            # the method's terms (a prior; a penalty where the engine owns the gradients) are trained, not logged
            loss = controller.regularize(task_loss) if controller else task_loss
            backend.backward(loss)
            if controller:
                controller.after_backward()
            clip_gradients(backend, run.grad_clip)  # the gradient the step uses, decay term included
            backend.step()
            # the logged loss is the task's, comparable with a run without the method, unless the trained one is not
            # finite; both read in one transfer (one device sync per step)
            total_value, task_value = (torch.stack([loss.detach(), task_loss.detach()]).tolist()
                                       if loss is not task_loss else [float(loss.detach())] * 2)
            loss_value = task_value if math.isfinite(total_value) else total_value
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
