"""The training loop of `dist-lowrank train`, the same for every backend.

The loop owns data, loss, evaluation and logging; the backend owns backward/step and resharding;
the controller decides when ranks change. Rank 0 writes the logs.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from dist_lowrank.backends.base import Backend
from dist_lowrank.checkpoint.manifest import Manifest, apply_layout
from dist_lowrank.config import LowRankConfig, config_to_dict
from dist_lowrank.controller import LowRankController
from dist_lowrank.errors import ConfigError
from dist_lowrank.gc_freeze import startup_objects_frozen
from dist_lowrank.inrank_model import to_inrank
from dist_lowrank.layers import frobenius_decay_, frobenius_penalty
from dist_lowrank.surgery import count_parameters
from dist_lowrank.telemetry.analytic import expected_step_bytes, family
from dist_lowrank.telemetry.comm import CommCounter
from dist_lowrank.train.checkpointing import export_fp32, find_resume, load_checkpoint, save_checkpoint
from dist_lowrank.train.run_config import RunConfig
from dist_lowrank.train.tasks import Task, build_task


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mean_over_ranks(value: float) -> float:
    """Average of a scalar over all ranks (collective; identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    from dist_lowrank.device import comm_device

    tensor = torch.tensor([value], dtype=torch.float64, device=comm_device())
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def comm_model_name(run: RunConfig) -> Optional[str]:
    """The analytic communication model that describes this run's backend (None: nothing communicated)."""
    return {"local": None, "ddp": "ddp", "fsdp2": "fsdp2"}.get(run.backend, f"zero{run.zero_stage}")


def trainable_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(getattr(p, "ds_shape", p.shape)) for p in model.parameters() if p.requires_grad]


def make_backend(run: RunConfig, task: Task, lowrank: LowRankConfig, comm_hook=None,
                 manifest: Optional[Manifest] = None) -> Backend:
    """The engine named in the run config, around the task's model (in InRank form for InRank); on resume
    with the checkpoint's layer shapes (and DeepSpeed's param-group layout) before the engine exists."""
    def model_fn() -> nn.Module:
        model = task.model_fn()
        model = to_inrank(model, lowrank) if lowrank.strategy == "inrank" else model
        return apply_layout(model, manifest.layout) if manifest is not None else model

    def optimizer_factory(params):
        return torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay)

    if run.backend == "local":
        from dist_lowrank.backends.local_backend import LocalBackend

        return LocalBackend(model_fn(), optimizer_factory)
    if run.backend == "ddp":
        from dist_lowrank.backends.ddp_backend import DDPBackend

        return DDPBackend(model_fn(), optimizer_factory, comm_hook=comm_hook)
    if run.backend == "fsdp2":
        from dist_lowrank.backends.fsdp2_backend import FSDP2Backend, shard_each_layer

        return FSDP2Backend(model_fn, shard_each_layer, optimizer_factory)
    from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend

    ds_config = {"train_micro_batch_size_per_gpu": run.batch_size, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": run.zero_stage, "stage3_param_persistence_threshold": 0},
                 "steps_per_print": 10**9}
    groups = manifest.engine.get("group_names") if manifest is not None else None
    if manifest is not None and DeepSpeedBackend.needs_universal(manifest.engine):
        ds_config["checkpoint"] = {"load_universal": True}  # another world size: DeepSpeed's universal checkpoint
    return DeepSpeedBackend(model_fn(), ds_config, optimizer_factory, group_names=groups)


class RunLogger:
    """JSON-lines log of metrics and controller events (rank 0 only), plus TensorBoard scalars."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool = True, resume_step: Optional[int] = None) -> None:
        """resume_step: continue a run's logs from that step (records after it, from the interrupted
        attempt, are dropped; TensorBoard purges them the same way with purge_step)."""
        self.enabled = enabled
        self.path = Path(out_dir)
        self.writer = None
        if enabled:
            self.path.mkdir(parents=True, exist_ok=True)
            kept = _records_until(self.path / "events.jsonl", resume_step) if resume_step is not None else []
            self.file = open(self.path / "events.jsonl", "w")
            self.file.writelines(kept)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                purge = resume_step + 1 if resume_step is not None else None
                self.writer = SummaryWriter(str(self.path / "tb"), purge_step=purge)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record, default=float) + "\n")
        self.file.flush()
        if self.writer is None:
            return
        step = int(record.get("step", 0))
        if record.get("event") == "train":
            self.writer.add_scalar("train/loss", record["loss"], step)
            self.writer.add_scalar("perf/step_time", record["step_time"], step)
            self.writer.add_scalar("perf/samples_per_sec", record["samples_per_sec"], step)
            self.writer.add_scalar("perf/tokens_per_sec", record["tokens_per_sec"], step)
            self.writer.add_scalar("lowrank/params", record["params"], step)
            self.writer.add_scalar("lowrank/compression_ratio", record["compression_ratio"], step)
            for op, value in record.get("comm_bytes_per_step", {}).items():
                self.writer.add_scalar(f"comm/bytes_per_step/{op}", value, step)
        elif record.get("event") == "comm_model":
            for op, value in record["expected"].items():
                self.writer.add_scalar(f"comm/analytic_bytes_per_step/{op}", value, step)
        elif record.get("event") == "eval":
            for key, value in record.items():
                if key.startswith("val_"):
                    self.writer.add_scalar(f"eval/{key}", value, step)
        elif record.get("event") == "estimate":
            for name, value in record["sranks"].items():
                if math.isfinite(value):
                    self.writer.add_scalar(f"lowrank/srank/{name}", value, step)
        elif record.get("event") == "spectrum":
            self.writer.add_scalar("comm/bytes_per_check/gram", record["gram_bytes"], step)
        elif record.get("event") in ("switch", "grow", "fix"):
            for name, rank in record["ranks"].items():
                self.writer.add_scalar(f"lowrank/rank/{name}", rank, step)
            self.writer.add_scalar(f"lowrank/events/{record['event']}", len(record["ranks"]), step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def _records_until(path: Path, step: int) -> list[str]:
    """Lines of a JSON-lines log whose step is at most `step` (the resumed prefix of an earlier attempt)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if record.get("event") != "summary" and int(record.get("step", 0)) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    return kept


def train(run: RunConfig, lowrank: LowRankConfig) -> dict[str, Any]:
    """Train for run.steps optimizer steps; return (and on rank 0 write) the run summary."""
    with startup_objects_frozen(run.backend):  # before any model: keeps the switch's gc pass short
        return _train(run, lowrank)


def _train(run: RunConfig, lowrank: LowRankConfig) -> dict[str, Any]:
    rank, world = _rank_world()
    if lowrank.cuttlefish.frobenius_decay > 0 and (run.backend == "fsdp2" or
                                                   (run.backend == "deepspeed" and run.zero_stage == 3)):
        raise ConfigError("lowrank.cuttlefish.frobenius_decay: not supported with sharded parameters (fsdp2, "
                          "ZeRO-3) yet; allowed there: 0")
    if run.deterministic:
        torch.use_deterministic_algorithms(True)
    resume = find_resume(run, lowrank)  # the manifest is read before any model is built
    manifest = resume[1] if resume else None
    start_step = manifest.step if manifest else 0
    torch.manual_seed(run.seed)
    task = build_task(run)
    params_full = count_parameters(task.model_fn())
    counter = CommCounter().install()  # before DeepSpeed builds its comm backend
    backend = make_backend(run, task, lowrank, comm_hook=counter.ddp_hook(), manifest=manifest)
    if resume:
        load_checkpoint(backend, *resume)
    logger = RunLogger(run.out_dir, enabled=rank == 0, resume_step=start_step if resume else None)
    logger.log({"event": "config", "run": vars(run), "lowrank": config_to_dict(lowrank), "world_size": world,
                "step": start_step, "resumed_from": str(resume[0]) if resume else None})
    model_name = comm_model_name(run)

    def log_comm_model(step: int, phase: str) -> None:
        expected = expected_step_bytes(model_name, trainable_shapes(backend.unwrapped_model()), world) \
            if model_name and world > 1 else {}
        logger.log({"event": "comm_model", "step": step, "phase": phase, "model": model_name, "expected": expected,
                    "params": count_parameters(backend.unwrapped_model())})

    phase = manifest.phase if manifest else "full"
    log_comm_model(start_step, phase)
    window: dict[str, float] = {}
    window_steps = 0
    steps_per_epoch = max(1, task.samples_per_epoch // (run.batch_size * world))
    controller: Optional[LowRankController] = None
    if lowrank.strategy != "none":
        controller = LowRankController(backend, lowrank, steps_per_epoch=steps_per_epoch, on_event=logger.log,
                                       resume_state=manifest.controller if manifest else None)
        if not manifest:
            controller.start()
    counter.reset()  # engine set-up (DeepSpeed broadcasts the model) and the init estimate are not training traffic
    batches = task.batches(rank, world)
    for _ in range(start_step):  # the data order is a function of the step: skip what was trained
        next(batches)

    def checkpoint(step: int) -> None:
        with counter.pause():
            path = save_checkpoint(run, lowrank, backend, controller.state_dict() if controller else None, step,
                                   phase, switch_step)
        logger.log({"event": "checkpoint", "step": step, "path": str(path)})
    show_bar = rank == 0 and sys.stderr.isatty() and not os.environ.get("CI")
    from tqdm import tqdm

    bar = tqdm(total=run.steps, disable=not show_bar, desc="train", dynamic_ncols=True)
    wall_start = time.perf_counter()
    evals: list[dict[str, Any]] = []
    switch_step: Optional[int] = manifest.switch_step if manifest else None
    bar.update(start_step)
    for step in range(start_step + 1, run.steps + 1):
        start = time.perf_counter()
        batch = next(batches)
        context = controller.record_shapes() if controller else nullcontext()
        with context:
            loss = task.loss_fn(backend.model, batch)
        decay = lowrank.cuttlefish.frobenius_decay if controller and controller.ranks else 0.0
        if decay > 0 and run.backend == "deepspeed":  # ZeRO takes gradients into its own buffers: use the loss
            loss = loss + frobenius_penalty(backend.unwrapped_model(), decay)
        backend.backward(loss)
        if decay > 0 and run.backend != "deepspeed":
            frobenius_decay_(backend.unwrapped_model(), decay)
        backend.step()
        loss_value = float(loss.detach())
        step_time = time.perf_counter() - start
        for op, value in counter.bytes.items():  # training traffic only: controller work is not a step's
            window[family(op)] = window.get(family(op), 0.0) + value
        window_steps += 1
        counter.reset()
        plan = controller.after_step(step, loss_value) if controller else None
        counter.reset()
        if plan is not None and plan.ranks:
            phase = "low" if plan.kind in ("switch", "fix") else f"grown@{step}"
            log_comm_model(step, phase)
        if plan is not None and plan.kind == "switch":
            switch_step = step
            if rank == 0:
                tqdm.write(f"[step {step}] switched {len(plan.ranks)} layers to low rank; "
                           f"params {params_full:,} -> {count_parameters(backend.unwrapped_model()):,}")
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if step % run.log_every == 0 or step == run.steps:
            with counter.pause():
                loss_value = mean_over_ranks(loss_value)  # the global batch's loss, as one process would see it
            params_now = count_parameters(backend.unwrapped_model())
            samples_per_sec = run.batch_size * world / step_time
            logger.log({"event": "train", "step": step, "phase": phase, "loss": loss_value, "step_time": step_time,
                        "samples_per_sec": samples_per_sec,
                        "tokens_per_sec": samples_per_sec * task.tokens_per_sample,
                        "params": params_now, "compression_ratio": params_full / params_now,
                        "comm_bytes_per_step": {op: v / window_steps for op, v in window.items()}})
            window, window_steps = {}, 0
        if (run.eval_every and step % run.eval_every == 0) or step == run.steps:
            metrics = task.evaluate(backend.unwrapped_model())
            evals.append({"step": step, **metrics})
            logger.log({"event": "eval", "step": step, **metrics})
            if rank == 0:
                tqdm.write(f"[step {step}] " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if run.checkpoint_every and (step % run.checkpoint_every == 0 or step == run.steps):
            checkpoint(step)
    bar.close()
    if run.export_fp32:
        with counter.pause():
            export_fp32(backend, Path(run.out_dir))
    counter.uninstall()
    summary = {
        "task": run.task, "backend": run.backend, "world_size": world, "strategy": lowrank.strategy,
        "steps": run.steps, "wall_seconds": time.perf_counter() - wall_start, "switch_step": switch_step,
        "params_full": params_full, "params_final": count_parameters(backend.unwrapped_model()),
        "ranks": dict(controller.ranks) if controller else {}, "final_eval": evals[-1] if evals else {},
        "skipped_nonfinite_steps": controller.skipped_steps if controller else 0,
    }
    logger.log({"event": "summary", **summary})
    logger.close()
    if rank == 0:
        Path(run.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(run.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        from dist_lowrank.telemetry.report import render_markdown, write_report

        print(render_markdown(write_report(run.out_dir)), end="")
    return summary
