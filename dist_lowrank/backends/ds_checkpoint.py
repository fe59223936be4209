"""DeepSpeed's own checkpoint format for a rebuilt engine: native save/load (engine.save_checkpoint /
load_checkpoint, the manifest in client_state), and a world-size change through DeepSpeed's universal
checkpoint (ds_to_universal, converted once by rank 0)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from dist_lowrank.backends import ds_state
from dist_lowrank.coordinator import Coordinator
from dist_lowrank.errors import CheckpointError


def save(engine: Any, directory: Path, tag: str, manifest_json: str) -> None:
    """Native checkpoint; the module carries DeepSpeed's universal-checkpoint marker so that
    ds_to_universal can convert it for another world size."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    if getattr(engine.module, UNIVERSAL_CHECKPOINT_INFO, None) is None:
        setattr(engine.module, UNIVERSAL_CHECKPOINT_INFO,
                {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    engine.save_checkpoint(str(directory), tag=tag, client_state={"dist_lowrank_manifest": manifest_json}, save_latest=False)


def needs_universal(engine_meta: Optional[dict[str, Any]]) -> bool:
    """A checkpoint from another world size loads through DeepSpeed's universal checkpoint (the engine
    must be built with `checkpoint.load_universal`)."""
    saved = (engine_meta or {}).get("world_size")
    return saved is not None and saved != (dist.get_world_size() if dist.is_initialized() else 1)


def load(engine: Any, stage: int, directory: Path, engine_meta: Optional[dict[str, Any]], tag: str,
         universal_dir: str) -> None:
    """Native load (optimizer and scheduler states); from another world size through the universal form. The
    fragment links and per-group steps DeepSpeed leaves unset or wrong are put right (ds_state)."""
    saved_stage = (engine_meta or {}).get("zero_stage", stage)
    if saved_stage != stage:
        raise CheckpointError(f"{directory}: saved with ZeRO stage {saved_stage}, this engine is stage "
                              f"{stage}; resume with run.zero_stage={saved_stage}")
    source = Path(directory)
    if needs_universal(engine_meta):
        if not engine.load_universal_checkpoint():
            raise CheckpointError(f"{directory}: saved on {engine_meta['world_size']} ranks; build the engine "
                                  f"with checkpoint.load_universal to load it here")
        source = universal_copy(source, tag, universal_dir)
    try:
        path, _ = engine.load_checkpoint(str(source), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    except (RuntimeError, AssertionError, ValueError) as exc:  # e.g. size mismatch naming the parameter
        raise CheckpointError(f"{source}: {str(exc).splitlines()[0][:300]}") from exc
    if path is None:
        raise CheckpointError(f"{source}/{tag}: DeepSpeed found no checkpoint to load")
    if ds_state.group_steps(engine)[0] is not None:
        ds_state.relink(engine)  # ZeRO-1/2 leave the fragment links of loaded state unset
    if source != Path(directory):
        ds_state.set_group_steps(engine, (engine_meta or {}).get("group_steps") or [])


def universal_copy(directory: Path, tag: str, name: str) -> Path:
    """Collective: `<directory>/<name>/<tag>`, DeepSpeed's universal form of the native checkpoint, converted
    once by rank 0 with deepspeed.checkpoint.ds_to_universal (a marker file says the conversion finished)."""
    import subprocess
    import sys

    target = directory / name
    done = target / "CONVERTED"
    failure: Optional[BaseException] = None
    if (not dist.is_initialized() or dist.get_rank() == 0) and not done.is_file():
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(directory / tag),
               "--output_folder", str(target / tag), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            failure = CheckpointError(f"{directory}: conversion to a universal checkpoint failed: {tail[0]}")
        else:
            done.write_text("ok\n")
    Coordinator().raise_if_any_failed(failure, "universal checkpoint conversion")  # no rank left waiting
    return target
