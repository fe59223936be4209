"""Checkpoint directories and the commit protocol: a checkpoint is "latest" only once every rank wrote it.

Layout under the checkpoint root:
    step_000120/            one checkpoint: manifest.json, the engine's files, and last of all COMMIT
    latest                  the step of the newest committed checkpoint (rewritten atomically)
Save: every rank writes its part, a barrier, then rank 0 writes COMMIT and updates `latest`. A kill at
any point before COMMIT leaves a directory without it: `latest_committed` skips it with a warning and
the run resumes from the previous good one. A directory being replaced is removed before the new save.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from dist_lowrank.errors import CheckpointError

log = logging.getLogger("dist_lowrank")
COMMIT = "COMMIT"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def begin_save(root: Path, step: int) -> Path:
    """Collective: an empty directory for this step's checkpoint on every rank (an older one is removed)."""
    path = step_dir(root, step)
    if _is_rank0():
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    _barrier()
    return path


def commit(root: Path, step: int, keep: int = 0) -> Path:
    """Collective: after every rank finished writing, mark the checkpoint complete and make it latest.
    keep > 0 removes all but the newest `keep` committed checkpoints."""
    _barrier()
    path = step_dir(root, step)
    if _is_rank0():
        (path / COMMIT).write_text(f"{step}\n")
        tmp = Path(root) / f".{LATEST}.tmp"
        tmp.write_text(f"{step}\n")
        os.replace(tmp, Path(root) / LATEST)
        if keep > 0:
            for old in committed_steps(root)[:-keep]:
                shutil.rmtree(step_dir(root, old), ignore_errors=True)
    _barrier()
    return path


def committed_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under root, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / COMMIT).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_committed(root: Path) -> Optional[Path]:
    """The newest complete checkpoint, or None. Incomplete ones (no COMMIT: a save that was killed) are
    skipped with a warning naming them."""
    root = Path(root)
    if not root.is_dir():
        return None
    for entry in sorted(root.iterdir(), reverse=True):
        if _STEP_DIR.match(entry.name) and not (entry / COMMIT).is_file():
            log.warning("%s: incomplete checkpoint (no %s marker; its save did not finish) - skipped", entry, COMMIT)
    steps = committed_steps(root)
    return step_dir(root, steps[-1]) if steps else None


def resolve_checkpoint(resume: str, root: Path) -> Optional[Path]:
    """run.resume → a committed checkpoint directory: "auto" = the latest under root if any, "never" = None,
    anything else = that directory, which must be complete."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_committed(root)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"run.resume: {path} is not a directory")
    if not (path / COMMIT).is_file():
        raise CheckpointError(f"run.resume: {path} is incomplete (no {COMMIT} marker: its save did not finish)")
    return path
