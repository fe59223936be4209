"""Save a switched model for inference, and load it back with its layout (the shapes travel with the weights).

    dist_lowrank.save_lowrank(engine_or_backend, "out/")      # collective; rank 0 writes the files
    model = dist_lowrank.load_lowrank(build_model, "out/")     # any process, no engine, no process group

A switched model no longer has the shapes its model function builds, so a plain `load_state_dict` fails.
`save_lowrank` writes the consolidated fp32 state dict (`model_fp32.pt`, the backend's `export_fp32`) and
the layer layout (`layout.json`, the same files `run.export_fp32` writes); `load_lowrank` builds the model,
gives it the saved layout (`checkpoint.manifest.apply_layout`) and loads the weights. Names are stored as
the user's model spells them: wrappers' prefixes (activation checkpointing's `_checkpoint_wrapped_module.`)
are removed, and tied weights are stored once and loaded into every owner.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from dist_lowrank.errors import CheckpointError

from dist_lowrank.surgery import clean_name

WEIGHTS = "model_fp32.pt"
LAYOUT = "layout.json"


def _backend_of(obj: Any):
    """The dist_lowrank backend behind what the user holds: a backend, a controller (`.backend`) or the
    engine from `deepspeed_api.initialize` (read from the instance dict: the proxy forwards other names)."""
    from dist_lowrank.backends.base import Backend

    if isinstance(obj, Backend):
        return obj
    attrs = getattr(obj, "__dict__", {})
    for key in ("backend", "_backend"):
        if isinstance(attrs.get(key), Backend):
            return attrs[key]
    return None


def save_lowrank(obj: Union[nn.Module, Any], directory: Union[str, Path]) -> Optional[Path]:
    """Collective on a backend (every rank calls it): write `model_fp32.pt` and `layout.json` into
    `directory` on rank 0; returns the weights' path there, None on other ranks. If rank 0 cannot write,
    every rank raises the same RemoteRankError naming it (no rank is left waiting in its next collective).

    `obj`: the engine returned by `deepspeed_api.initialize`, a backend (FSDP2Backend, DDPBackend, ...),
    a controller, or a plain (unsharded) nn.Module (no collective then).
    """
    from dist_lowrank.coordinator import Coordinator

    backend = _backend_of(obj)
    if backend is not None:
        state, model = backend.export_fp32(), backend.unwrapped_model()
        with Coordinator().shared_failure(f"save_lowrank to {directory}"):
            return None if state is None else _write(Path(directory), state, model)
    if isinstance(obj, nn.Module):
        return _write(Path(directory), {k: v.detach().float().cpu().clone() for k, v in obj.state_dict().items()}, obj)
    raise TypeError(f"save_lowrank: expected an engine from deepspeed_api.initialize, a backend, a controller "
                    f"or an nn.Module, got {type(obj).__name__}")


def _write(out: Path, state: dict[str, torch.Tensor], model: nn.Module) -> Path:
    """The two files, under the unwrapped model's names."""
    from dist_lowrank.checkpoint.manifest import layout_of

    out.mkdir(parents=True, exist_ok=True)
    weights = {clean_name(k): v for k, v in state.items()}
    layout = {clean_name(k): v for k, v in layout_of(model).items()}
    torch.save(weights, out / WEIGHTS)
    (out / LAYOUT).write_text(json.dumps(layout, indent=2, sort_keys=True))
    return out / WEIGHTS


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """state-dict key → every key that is the same tensor (tied weights), itself included."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return {name: names for names in groups.values() for name in names}


def load_lowrank(model_or_fn: Union[nn.Module, Callable[[], nn.Module]], directory: Union[str, Path],
                 map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """The model (a fresh module, or `model_fn()`) with the saved layout and weights; ready for inference.

    Every key of the model's state dict must come from the file (a tied weight counts once); a missing or
    surplus key or a shape mismatch is one CheckpointError line naming the tensor.
    """
    source = Path(directory)
    for name in (WEIGHTS, LAYOUT):
        if not (source / name).is_file():
            raise CheckpointError(f"{source / name}: missing (write it with dist_lowrank.save_lowrank)")
    from dist_lowrank.checkpoint.manifest import apply_layout

    model = model_or_fn if isinstance(model_or_fn, nn.Module) else model_or_fn()
    apply_layout(model, json.loads((source / LAYOUT).read_text()))
    saved = torch.load(source / WEIGHTS, map_location=map_location, weights_only=True)
    own = model.state_dict()
    aliases = _aliases(model)
    persistent = set(own)
    extra = sorted(k for k in saved if k not in persistent and k not in dict(model.named_buffers()))
    if extra:
        raise CheckpointError(f"{source / WEIGHTS}: {extra[0]} is not in the model (built with another model_fn?)")
    state = {}
    for key in own:
        present = [k for k in aliases.get(key, [key]) if k in saved]
        if not present:
            raise CheckpointError(f"{source / WEIGHTS}: no tensor for {key} (saved from another model?)")
        value = saved[present[0]]
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{source / WEIGHTS}: {present[0]} has shape {tuple(value.shape)}, the model's "
                                  f"{key} has {tuple(own[key].shape)}")
        state[key] = value
    model.load_state_dict(state)  # non-persistent buffers (e.g. rotary tables) are the model's own, as built
    return model
