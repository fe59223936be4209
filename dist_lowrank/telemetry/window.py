"""Step-window bookkeeping: what the steps since the last log record sent and how long they took.

A window never spans a change of layer shapes: the telemetry closes it at the step of a switch or a
growth (that step's training traffic was sent before the change) and opens a new one for the next
phase, so every phase has its own measured bytes. The first step of a run and of each phase pays
one-off costs (lazy engine set-up, new buffers after a rebuild); its time is left out of the window's
throughput unless it is the window's only step. Its bytes count: they are the phase's traffic.
"""
from __future__ import annotations

from typing import Any, Optional

from dist_lowrank.telemetry.analytic import family


class StepWindow:
    """Bytes per op family, step count and step times of the steps since the last record."""

    def __init__(self) -> None:
        self.bytes: dict[str, float] = {}
        self.steps = 0
        self.timed_seconds = 0.0
        self.timed_steps = 0
        self.first_seconds: Optional[float] = None
        self.loss = float("nan")
        self.skip_next_time = True  # a run starts cold

    def add(self, step_bytes: dict[str, float], seconds: float, loss: float) -> None:
        """One optimizer step: its collectives' bytes (by counter op name), its wall time and loss."""
        for op, value in step_bytes.items():
            self.bytes[family(op)] = self.bytes.get(family(op), 0.0) + value
        if self.skip_next_time:
            self.first_seconds, self.skip_next_time = seconds, False
        else:
            self.timed_seconds += seconds
            self.timed_steps += 1
        self.steps += 1
        self.loss = loss

    def step_time(self) -> Optional[float]:
        """Mean seconds per warm step (the cold first step only when nothing else was timed)."""
        if self.timed_steps:
            return self.timed_seconds / self.timed_steps
        return self.first_seconds

    def close(self) -> dict[str, Any]:
        """The window's numbers, and a fresh window (the next step is warm)."""
        out = {"window_steps": self.steps, "step_time": self.step_time(),
               "comm_bytes_per_step": {op: v / self.steps for op, v in self.bytes.items()} if self.steps else {}}
        self.bytes, self.steps, self.timed_seconds, self.timed_steps, self.first_seconds = {}, 0, 0.0, 0, None
        return out

    def cold(self) -> None:
        """The next step follows a change of shapes: keep its time out of the throughput."""
        self.skip_next_time = True
