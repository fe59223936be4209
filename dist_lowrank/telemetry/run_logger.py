"""The run's log on rank 0: `events.jsonl` (every record) and TensorBoard scalars (the numeric ones).

One writer for `dist-lowrank train` and for the library API, so both produce the same tags and the
same records, and `dist-lowrank report DIR` reads either.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional


class RunLogger:
    """JSON-lines log of metrics and controller events (rank 0 only), plus TensorBoard scalars."""

    def __init__(self, out_dir: Optional[str], enabled: bool, tensorboard: bool = True,
                 resume_step: Optional[int] = None, tensorboard_dir: Optional[str] = None) -> None:
        """out_dir: holds events.jsonl (None: no JSON log); TensorBoard goes to `tensorboard_dir`, default
        out_dir/tb. resume_step: continue a run's logs from that step (records after it, from the interrupted
        attempt, are dropped; TensorBoard purges them the same way with purge_step)."""
        self.enabled = enabled
        self.path = Path(out_dir) if out_dir else None
        self.writer = None
        self.file = None
        if not enabled:
            return
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            kept = _records_until(self.path / "events.jsonl", resume_step) if resume_step is not None else []
            self.file = open(self.path / "events.jsonl", "w")
            self.file.writelines(kept)
        tb_dir = tensorboard_dir or (str(self.path / "tb") if self.path is not None else None)
        if tensorboard and tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(tb_dir, purge_step=purge)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.write(json.dumps(record, default=float) + "\n")
            self.file.flush()
        if self.writer is not None:
            self._scalars(record)

    def _scalars(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        add = self.writer.add_scalar
        if record.get("event") == "train":
            add("train/loss", record["loss"], step)
            for key in ("step_time", "samples_per_sec", "tokens_per_sec"):
                if record.get(key) is not None:
                    add(f"perf/{key}", record[key], step)
            add("lowrank/params", record["params"], step)
            if record.get("trainable_params") is not None:
                add("lowrank/trainable_params", record["trainable_params"], step)
            add("lowrank/compression_ratio", record["compression_ratio"], step)
            for op, value in record.get("comm_bytes_per_step", {}).items():
                add(f"comm/bytes_per_step/{op}", value, step)
        elif record.get("event") == "comm_model":
            for op, value in record["expected"].items():
                add(f"comm/analytic_bytes_per_step/{op}", value, step)
        elif record.get("event") == "eval":
            for key, value in record.items():
                if key.startswith("val_"):
                    add(f"eval/{key}", value, step)
        elif record.get("event") == "estimate":
            for name, value in record["sranks"].items():
                if math.isfinite(value):
                    add(f"lowrank/srank/{name}", value, step)
        elif record.get("event") == "spectrum":
            add("comm/bytes_per_check/gram", record["gram_bytes"], step)
        elif record.get("event") == "rank_update":  # a method that adapts ranks every step, at each change
            for name, rank in record["ranks"].items():
                add(f"lowrank/rank/{name}", rank, step)
            for name, capacity in (record.get("capacities") or {}).items():
                add(f"lowrank/capacity/{name}", capacity, step)
            if record.get("integrator_bytes") is not None:
                add("comm/bytes_per_step/integrator", record["integrator_bytes"], step)
        elif record.get("event") == "prior":  # a method with a prior over rank slots, every step
            add("lowrank/kl_weight", record["kl_weight"], step)
            for name, rank in record["effective_ranks"].items():
                add(f"lowrank/effective_rank/{name}", rank, step)
        elif record.get("event") in ("switch", "grow", "fix"):
            for name, rank in record["ranks"].items():
                add(f"lowrank/rank/{name}", rank, step)
            add(f"lowrank/events/{record['event']}", len(record["ranks"]), step)
            seconds = (record.get("measurements") or {}).get("seconds")
            if seconds is not None:
                add(f"lowrank/{record['event']}_seconds", seconds, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


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
