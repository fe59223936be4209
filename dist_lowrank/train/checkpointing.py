"""Checkpoints of `dist-lowrank train`: what goes into the manifest, when a resume is refused, the export.

The engine files are the backend's business (DeepSpeed native, FSDP2 torch.distributed.checkpoint, DDP
plain state dicts); this module builds the manifest around them and runs the commit protocol of
`dist_lowrank.checkpoint.store`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from dist_lowrank.backends.base import Backend
from dist_lowrank.checkpoint.manifest import (Manifest, check_layout, check_param_shapes, layout_of, read_manifest,
                                              write_manifest)
from dist_lowrank.checkpoint.store import begin_save, commit, resolve_checkpoint
from dist_lowrank.config import LowRankConfig, config_to_dict
from dist_lowrank.config_io import changed_keys, dataclass_to_dict
from dist_lowrank.errors import CheckpointError
from dist_lowrank.faults import maybe_fault
from dist_lowrank.train.run_config import RunConfig

# Keys a resumed run may change freely: how long and how often, where to, on how many ranks (with the
# per-rank batch that keeps the global batch).
RESUMABLE_CHANGES = {"run.steps", "run.resume", "run.world_size", "run.batch_size", "run.eval_every", "run.log_every",
                     "run.ood_eval", "run.checkpoint_every", "run.keep_checkpoints", "run.allow_config_change", "run.export_fp32",
                     "run.out_dir", "run.checkpoint_dir"}


def checkpoint_root(run: RunConfig) -> Path:
    return Path(run.checkpoint_dir) if run.checkpoint_dir else Path(run.out_dir) / "checkpoints"


def config_dict(run: RunConfig, lowrank: LowRankConfig) -> dict[str, Any]:
    return {"run": dataclass_to_dict(run), "lowrank": config_to_dict(lowrank)}


def find_resume(run: RunConfig, lowrank: LowRankConfig) -> Optional[tuple[Path, Manifest]]:
    """The checkpoint to resume from (run.resume) and its manifest, read before any model is built.
    A changed config is refused with the changed keys named unless run.allow_config_change."""
    path = resolve_checkpoint(run.resume, checkpoint_root(run))
    if path is None:
        return None
    manifest = read_manifest(path)
    changed = [k for k in changed_keys(manifest.config, config_dict(run, lowrank)) if k not in RESUMABLE_CHANGES]
    if changed and not run.allow_config_change:
        raise CheckpointError(f"{path}: the config changed since this checkpoint ({', '.join(changed)}); "
                              f"resume with the saved values or set run.allow_config_change=true")
    return path, manifest


def save_checkpoint(run: RunConfig, lowrank: LowRankConfig, backend: Backend, controller_state: Optional[dict],
                    step: int, phase: str, switch_step: Optional[int]) -> Path:
    """Collective: engine state + manifest into step_<N>/, then COMMIT once every rank has written."""
    root = checkpoint_root(run)
    directory = begin_save(root, step)
    world = dist.get_world_size() if dist.is_initialized() else 1
    config = config_dict(run, lowrank)
    manifest = Manifest.of(backend, step=step, phase=phase, switch_step=switch_step, controller=controller_state,
                           config=config, world_size=world, seed=run.seed)
    text = manifest.to_json()
    backend.save_state(directory, text)
    maybe_fault("save", step)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_manifest(directory, manifest)
    return commit(root, step, keep=run.keep_checkpoints)


def load_checkpoint(backend: Backend, path: Path, manifest: Manifest) -> None:
    """Engine state into a backend built with the manifest's layout (checked first, layer named)."""
    if manifest.backend != backend.name:
        raise CheckpointError(f"{path}: written by the {manifest.backend} backend, this run uses {backend.name}")
    check_layout(backend.unwrapped_model(), manifest.layout)
    check_param_shapes(backend.unwrapped_model(), manifest.param_shapes)
    backend.load_state(path, manifest.engine)


def export_fp32(backend: Backend, out_dir: Path) -> Optional[Path]:
    """Collective: the consolidated fp32 state dict and its layout (`model_fp32.pt`, `layout.json`) on rank 0."""
    state = backend.export_fp32()
    if state is None:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "model_fp32.pt")
    (out / "layout.json").write_text(json.dumps(layout_of(backend.unwrapped_model()), indent=2, sort_keys=True))
    return out / "model_fp32.pt"
