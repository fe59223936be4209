"""One run's telemetry, the same for `dist-lowrank train` and for the library API.

The training loop (the CLI's, or the user's through `LowRankController.after_step` and the DeepSpeed
proxy's `step`) reports each optimizer step; this object measures what the step sent (CommCounter),
keeps the step window, and on rank 0 writes `events.jsonl` and TensorBoard (RunLogger): per window the
loss, step time, samples/s and tokens/s, parameter counts (total and trainable) and measured bytes per
step by op; per phase (full, low, grown@N, resize@N) the analytic bytes beside them; the controller's events
(stable ranks, ranks, the switch's cost). `close()` writes the summary and the report.

Every rank calls the same methods at the same steps: a window's loss is averaged over ranks with one
all-reduce (not counted as training traffic), at steps every rank agrees on (log cadence, plan steps).
"""
from __future__ import annotations

import atexit
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from dist_lowrank.device import is_distributed
from torch import nn

from dist_lowrank.telemetry.analytic import expected_step_bytes
from dist_lowrank.telemetry.comm import CommCounter
from dist_lowrank.telemetry.params import param_shapes, parameter_counts
from dist_lowrank.telemetry.run_logger import RunLogger
from dist_lowrank.telemetry.window import StepWindow

CHANGE_EVENTS = ("switch", "grow", "fix")
log = logging.getLogger("dist_lowrank")


def rank_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mean_over_ranks(value: float) -> float:
    """Average of a scalar over all ranks (collective; identity without a process group)."""
    if not is_distributed():
        return value
    from dist_lowrank.device import comm_device

    tensor = torch.tensor([value], dtype=torch.float64, device=comm_device())
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def comm_model_of(backend: Any) -> Optional[str]:
    """The analytic model (telemetry.analytic) that describes a backend: ddp, fsdp2, zero1/2/3; None for one
    process. Read from the backend's `name` (and DeepSpeed's `stage`), so telemetry imports no backend."""
    name = getattr(backend, "name", None)
    if name == "deepspeed":
        return f"zero{int(getattr(backend, 'stage', 0))}"
    return name if name in ("ddp", "fsdp2") else None


def phase_after(kind: str, step: int) -> str:
    """The phase a change starts: low rank after a switch / fix, `grown@step` after a growth, `<kind>@step` after
    another change of shape (a capacity resize)."""
    if kind in ("switch", "fix"):
        return "low"
    return f"grown@{step}" if kind == "grow" else f"{kind}@{step}"


class RunTelemetry:
    """Counter + step window + rank-0 logger for one run; see the module docstring for the protocol."""

    def __init__(self, out_dir: Optional[str], log_every: int, comm_model: Optional[str],
                 samples_per_step: Optional[float] = None, tokens_per_sample: Optional[float] = None,
                 tensorboard_dir: Optional[str] = None, tensorboard: bool = True,
                 counter: Optional[CommCounter] = None, resume_step: Optional[int] = None) -> None:
        self.rank, self.world = rank_world()
        self.out_dir, self.log_every, self.comm_model = out_dir, int(log_every), comm_model
        self.samples_per_step, self.tokens_per_sample = samples_per_step, tokens_per_sample
        self.counter = counter if counter is not None else CommCounter().install()
        self.owns_counter = counter is None
        self.logger = RunLogger(out_dir, enabled=self.rank == 0, tensorboard=tensorboard, resume_step=resume_step,
                                tensorboard_dir=tensorboard_dir)
        self.window = StepWindow()
        self.phase = "full"
        self.step = 0
        self.switch_step: Optional[int] = None
        self.ranks: dict[str, int] = {}
        self.params_full: dict[str, int] = {}
        self.phase_counts: dict[str, int] = {}
        self.model_fn: Callable[[], nn.Module] = lambda: nn.Module()
        self._mark = self._start = time.perf_counter()
        self.train_seconds = 0.0  # steps (data, forward, backward, step) + the controller's work, this process
        self.closed = False
        self.summary_extra: dict[str, Any] = {}

    # -- set-up ---------------------------------------------------------------------------------------
    def begin(self, model_fn: Callable[[], nn.Module], config: dict[str, Any], step: int = 0, phase: str = "full",
              params_full: Optional[dict[str, int]] = None) -> None:
        """Log the config and the analytic model of the current shapes; count from here on. model_fn returns
        the current (unwrapped) model each time (engines rebuild it at a switch)."""
        self.model_fn, self.step, self.phase = model_fn, step, phase
        self.params_full = params_full or parameter_counts(model_fn())
        self.log({"event": "config", "world_size": self.world, "step": step, "log_every": self.log_every,
                  "samples_per_step": self.samples_per_step, "tokens_per_sample": self.tokens_per_sample, **config})
        self.log_comm_model(step)
        self.ready()

    def ready(self) -> None:
        """Training starts now: what was sent so far (engine set-up, the init estimate) is not a step's."""
        self.counter.reset()
        self._mark = time.perf_counter()

    def log(self, record: dict[str, Any]) -> None:
        """Write a record (rank 0); the controller's events come in here too."""
        if record.get("event") in CHANGE_EVENTS and record.get("ranks"):
            self.ranks.update(record["ranks"])
            if record["event"] == "switch" and self.switch_step is None:
                self.switch_step = int(record["step"])
        self.logger.log(record)

    def log_comm_model(self, step: int) -> None:
        """The phase's analytic bytes and parameter counts (its windows report these counts)."""
        model = self.model_fn()
        self.phase_counts = parameter_counts(model)
        expected = expected_step_bytes(self.comm_model, param_shapes(model, True), self.world,
                                       frozen_shapes=param_shapes(model, False)) \
            if self.comm_model and self.world > 1 else {}
        self.log({"event": "comm_model", "step": step, "phase": self.phase, "model": self.comm_model,
                  "expected": expected, **self.phase_counts})

    # -- per step -------------------------------------------------------------------------------------
    def restart_clock(self) -> None:
        """A step starts now (a loop that also evaluates or saves between steps calls this before a step)."""
        self._mark = time.perf_counter()

    def end_step(self, step: int, loss: float) -> None:
        """The optimizer step `step` is done: its traffic so far is training traffic, its time the time since
        the last step's controller work ended (or `restart_clock`): the loop's data, forward, backward, step."""
        self.window.add(self.counter.snapshot(), time.perf_counter() - self._mark, float(loss))
        self.counter.reset()
        self.step = step

    def after_controller(self, step: int, plan: Any = None) -> None:
        """After the controller's work of `step` (its collectives are not a step's traffic): at a change of
        shapes close the window in the old phase and log the new phase's analytic bytes; log on cadence.
        The time since the step began (a switch included) counts into `train_seconds`."""
        self.train_seconds += time.perf_counter() - self._mark
        self.counter.reset()
        if plan is not None and getattr(plan, "ranks", None):
            if self.window.steps:
                self.flush(step)
            self.phase = phase_after(plan.kind, step)
            self.log_comm_model(step)
            self.window.cold()
        elif step % self.log_every == 0 and self.window.steps:
            self.flush(step)
        self.counter.reset()
        self._mark = time.perf_counter()

    def flush(self, step: int) -> None:
        """Collective: write the window as one `train` record (loss averaged over ranks)."""
        with self.counter.pause():
            loss = mean_over_ranks(self.window.loss)  # the global batch's loss, as one process would see it
        counts = self.phase_counts  # the window's phase (a change may have rebuilt the model since)
        numbers = self.window.close()
        step_time = numbers["step_time"]
        samples = self.samples_per_step / step_time if self.samples_per_step and step_time else None
        tokens = samples * self.tokens_per_sample if samples is not None and self.tokens_per_sample else None
        self.log({"event": "train", "step": step, "phase": self.phase, "loss": loss, **numbers,
                  "samples_per_sec": samples, "tokens_per_sec": tokens, "params": counts["params"],
                  "trainable_params": counts["trainable"],
                  "compression_ratio": self.params_full["trainable"] / max(1, counts["trainable"])})

    # -- end ------------------------------------------------------------------------------------------
    def summary(self, **extra: Any) -> dict[str, Any]:
        counts = parameter_counts(self.model_fn())
        out = {"task": None, "backend": self.comm_model or "local", "world_size": self.world, "strategy": None,
               "steps": self.step, "wall_seconds": time.perf_counter() - self._start, "switch_step": self.switch_step,
               "params_full": self.params_full["params"], "params_final": counts["params"],
               "trainable_params_full": self.params_full["trainable"], "trainable_params_final": counts["trainable"],
               "ranks": dict(self.ranks), "final_eval": {}}
        out.update(self.summary_extra)
        out.update(extra)
        return out

    def close(self, flush: bool = True, report: bool = True, **summary: Any) -> dict[str, Any]:
        """Write the last window (collective when `flush`), the summary record, summary.json and the report
        (rank 0); stop counting. Idempotent. Returns the summary."""
        if self.closed:
            return self.summary(**summary)
        if flush and self.window.steps:
            self.flush(self.step)
        self.closed = True
        result = self.summary(**summary)
        self.log({"event": "summary", **result})
        self.logger.close()
        if self.owns_counter:
            self.counter.uninstall()
        if self.rank == 0 and self.out_dir:
            Path(self.out_dir, "summary.json").write_text(json.dumps(result, indent=2, default=float))
            if report:
                from dist_lowrank.telemetry.report import write_report

                write_report(self.out_dir)
        return result

    def close_at_exit(self) -> None:
        """Library runs: if the script never calls close(), write the summary and the report at interpreter
        exit (rank 0, no collective: the last partial window is left out)."""
        def at_exit() -> None:
            if self.closed:
                return
            try:
                self.close(flush=False)
            except Exception as exc:  # never mask the script's own exit status or error
                log.warning("dist_lowrank telemetry: could not write the summary at exit: %s", exc)

        atexit.register(at_exit)
