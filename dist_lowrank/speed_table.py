"""A stored table of measured layer times, read at the switch instead of timing there: the same plan every run.

Timed live at the switch, the rank search decides from a few passes on the machine as it is at that moment. On a
shared host that moment differs from run to run, and so does the plan (BENCHMARKS.md §5: 8 searches of one plan
gave 4 plans; 20 passes instead of 5, or a line fitted to all timings of a shape, did not help), and with the plan
the final loss. The table is measured once on the device, in as many processes at once as training runs (they
contend for the machine the same way), every shape dense and at ranks every `step` apart, the median of several
timings each; the switch reads it through the profiler's timer hook (`table_timer`). A rank between two measured
ones reads the straight line between them; a shape or rank outside the table is timed live, as without one.
"""
from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from dist_lowrank.config_io import read_json_object
from dist_lowrank.errors import ConfigError
from dist_lowrank.layers.shapes import matrix_dims
from dist_lowrank.profiling import (Timer, param_dtype, plugin_rng, stand_in, time_interleaved, time_module,
                                    timing_key)

FORMAT = "dist_lowrank.speed_table/1"
log = logging.getLogger("dist_lowrank")


def device_kind(device: torch.device) -> str:
    """What a table's times are valid for: "cpu", or the CUDA device's name (an H100's times are not an A100's)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def shape_key(module: nn.Module, shape: tuple[int, ...], device: torch.device) -> str:
    """The table's key of a layer: everything its time depends on but the rank (the device kind, the layer's kind
    and dimensions, the input's shape, dtype and autocast), as JSON text."""
    return json.dumps([device_kind(device), *timing_key(module, shape, None)[:-1]])


class SpeedTable:
    """Seconds of one forward+backward per layer shape: dense, and factorized at the measured ranks."""

    def __init__(self, entries: Optional[dict[str, dict]] = None, meta: Optional[dict] = None) -> None:
        self.entries: dict[str, dict] = entries or {}  # shape key -> {"dense_s": t, "ranks": {rank: t}}
        self.meta: dict = meta or {}

    def seconds(self, module: nn.Module, shape: tuple[int, ...], rank: Optional[int],
                device: torch.device) -> Optional[float]:
        """The stored time (interpolated between the nearest measured ranks), or None if the table does not
        cover this device kind, shape or rank."""
        entry = self.entries.get(shape_key(module, shape, device))
        if entry is None:
            return None
        if rank is None:
            return entry["dense_s"]
        ranks = entry["ranks"]
        if rank in ranks:
            return ranks[rank]
        below = max((r for r in ranks if r < rank), default=None)
        above = min((r for r in ranks if r > rank), default=None)
        if below is None or above is None:
            return None
        return ranks[below] + (ranks[above] - ranks[below]) * (rank - below) / (above - below)

    @staticmethod
    def median(tables: Sequence["SpeedTable"], meta: Optional[dict] = None) -> "SpeedTable":
        """Entry by entry, the median of several measurements (of the same shapes and ranks)."""
        entries = {}
        for key in tables[0].entries:
            dense = statistics.median(t.entries[key]["dense_s"] for t in tables)
            ranks = {r: statistics.median(t.entries[key]["ranks"][r] for t in tables)
                     for r in tables[0].entries[key]["ranks"]}
            entries[key] = {"dense_s": dense, "ranks": ranks}
        return SpeedTable(entries, meta)

    def save(self, path: Path) -> Path:
        data = {"format": FORMAT, "meta": self.meta,
                "entries": {k: {"dense_s": e["dense_s"], "ranks": {str(r): t for r, t in sorted(e["ranks"].items())}}
                            for k, e in self.entries.items()}}
        Path(path).write_text(json.dumps(data, indent=1))
        return Path(path)

    @staticmethod
    def load(path: str | Path) -> "SpeedTable":
        """The table in `path`; a ConfigError naming the file and what is wrong with it."""
        path = Path(path)
        data = read_json_object(path, ConfigError, "no such file", label="switch.speed_table: ")
        if data.get("format") != FORMAT:
            raise ConfigError(f"switch.speed_table: {path}: not a speed table (format must be {FORMAT!r}; "
                              "write one with tools/bench_speed_table.py)")
        try:
            entries = {k: {"dense_s": float(e["dense_s"]), "ranks": {int(r): float(t) for r, t in e["ranks"].items()}}
                       for k, e in data["entries"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"switch.speed_table: {path}: malformed entry ({type(exc).__name__}: {exc})") from exc
        return SpeedTable(entries, data.get("meta", {}))


def measure_speed_table(modules: dict[str, nn.Module], shapes: dict[str, tuple[int, ...]], iters: int,
                        device: torch.device, step: int = 8, seed: int = 0, timer: Timer = time_module,
                        ranks: Optional[Sequence[int]] = None) -> SpeedTable:
    """Time every distinct layer shape dense and at ranks step, 2·step, … below its full rank (and rank 1), or at
    `ranks` (those below full rank), the stand-ins taking turns pass by pass as at the switch; the fastest of
    `iters` passes each."""
    jobs: dict[str, tuple[nn.Module, tuple]] = {}
    for name in sorted(modules):
        if name in shapes:
            jobs.setdefault(shape_key(modules[name], shapes[name], device), (modules[name], shapes[name]))
    entries: dict[str, dict] = {}
    for key, (module, shape) in jobs.items():
        full = min(matrix_dims(module))
        timed = sorted({1, *range(step, full, step)} if ranks is None else {r for r in ranks if 1 <= r < full})
        with plugin_rng(seed, device):
            stand_ins = [(stand_in(module, rank, device, param_dtype(shape)), shape) for rank in [None, *timed]]
            times = time_interleaved(stand_ins, iters, device, timer)
        entries[key] = {"dense_s": times[0], "ranks": dict(zip(timed, times[1:]))}
    return SpeedTable(entries)


def table_timer(table: SpeedTable, fallback: Timer = time_module) -> Timer:
    """A profiler timer that reads `table` and times live only what the table does not cover."""

    missed: set[str] = set()

    def timer(module: nn.Module, shape: tuple, iters: int, device: torch.device) -> float:
        rank = getattr(module, "rank", None)
        stored = table.seconds(module, shape, rank, device)
        if stored is not None:
            return stored
        key = f"{shape_key(module, shape, device)} rank {rank}"
        if key not in missed:
            missed.add(key)
            log.info("switch.speed_table has no time for %s: timed live", key)
        return fallback(module, shape, iters, device)

    return timer
