"""The checkpoint manifest: plain JSON that says which shapes the model had, readable before any model exists.

A run that switched or grew has layers whose parameter shapes differ from a freshly built model's, and no
engine can load state into the wrong shapes. So every checkpoint carries `manifest.json`: the layer layout
(layer → factorized rank, or InRank width and capacity), the controller's decision state, the config and
its digest, world size, seed and the engine's own bookkeeping (e.g. DeepSpeed's param-group layout).
Resume reads it first, builds the model with those shapes (`apply_layout`), then lets the engine load.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from torch import nn

from dist_lowrank.config_io import digest, read_json_object
from dist_lowrank.errors import CheckpointError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class Manifest:
    """Everything a loader needs before it builds the model (see the module docstring)."""

    step: int
    phase: str                                   # "full", "low", "grown@<step>" or "resize@<step>"
    switch_step: Optional[int]
    layout: dict[str, dict[str, Any]]           # layer → {"type": "lowrank", "rank"} | {"type": "inrank", ...}
    controller: Optional[dict[str, Any]]        # LowRankController.state_dict() (strategy/detector state)
    config: dict[str, Any]                      # {"run": ..., "lowrank": ...} as plain dicts
    config_digest: str
    world_size: int
    seed: int
    backend: str
    engine: dict[str, Any] = field(default_factory=dict)  # backend bookkeeping (DeepSpeed group layout, ...)
    param_shapes: dict[str, list[int]] = field(default_factory=dict)  # every parameter's global shape
    format_version: int = FORMAT_VERSION

    @classmethod
    def of(cls, backend: Any, *, step: int, phase: str, switch_step: Optional[int],
           controller: Optional[dict[str, Any]], config: dict[str, Any], world_size: int, seed: int) -> "Manifest":
        """The manifest of a running engine (any backend: its name, bookkeeping and model give layout and shapes),
        so the CLI's checkpoints and the HF Trainer's record the same fields the same way."""
        model = backend.unwrapped_model()
        return cls(step=step, phase=phase, switch_step=switch_step, layout=layout_of(model), controller=controller,
                   config=config, config_digest=digest(config), world_size=world_size, seed=seed,
                   backend=backend.name, engine=backend.engine_meta(), param_shapes=param_shapes(model))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    path.write_text(manifest.to_json())
    return path


def read_manifest(directory: Path) -> Manifest:
    """The manifest of a checkpoint directory; one CheckpointError line naming the file if it is unusable."""
    path = Path(directory) / MANIFEST
    data = read_json_object(path, CheckpointError,
                            "missing (not a dist_lowrank checkpoint, or its save did not finish)")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {data.get('format_version')!r}; this version reads "
                              f"{FORMAT_VERSION}")
    names = {f.name for f in Manifest.__dataclass_fields__.values()}
    missing = sorted(names - set(data) - {"engine", "param_shapes"})
    unknown = sorted(set(data) - names)
    if missing or unknown:
        raise CheckpointError(f"{path}: missing keys {missing}, unknown keys {unknown}")
    for name, entry in data["layout"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise CheckpointError(f"{path}: layout.{name}: expected {{'type': 'lowrank'|'inrank', ...}}, "
                                  f"got {entry!r}")
    return Manifest(**data)


def layout_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The shape-changing layers of a live model: every module that describes its own shape (`layout()`, e.g.
    factorized layers {"type": "lowrank", "rank"}, InRank {"type": "inrank", "width", "capacity"})."""
    layout: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "LAYOUT_TYPE", None), str) and callable(getattr(module, "layout", None)):
            layout[name] = module.layout()
    return layout


def apply_layout(model: nn.Module, layout: dict[str, dict[str, Any]]) -> nn.Module:
    """Give a freshly built model the checkpoint's shapes (values are left for the engine to load).

    Factorized layers become empty factorized modules of the saved rank; a method's own layer (same LAYOUT_TYPE,
    e.g. InRank's) takes the saved entry through its `with_layout(entry)`. A layer the model does not have, or of
    the wrong kind, fails loudly with its name.
    """
    from dist_lowrank.layers import empty_factorized, is_factorizable
    from dist_lowrank.surgery import replace_module

    modules = dict(model.named_modules())
    for name, entry in sorted(layout.items()):
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"layout.{name}: the model has no such layer")
        kind = getattr(module, "LAYOUT_TYPE", None)
        if entry["type"] == "lowrank":
            if not (is_factorizable(module) or (kind is not None and kind != "lowrank")):
                raise CheckpointError(f"layout.{name}: saved as factorized, but the model's layer is "
                                      f"{type(module).__name__}")
            reference = next(module.parameters())
            replace_module(model, name, empty_factorized(module, int(entry["rank"]), device=reference.device,
                                                         dtype=reference.dtype))
        elif kind is None and is_factorizable(module) and (built := _method_layer(module, entry)) is not None:
            replace_module(model, name, built)  # the run switched to a method's own layers mid-run
        else:
            if kind != entry["type"] or not callable(getattr(module, "with_layout", None)):
                raise CheckpointError(f"layout.{name}: saved as {entry['type']!r}, but the model's layer is "
                                      f"{type(module).__name__} (was the model prepared for that method, e.g. "
                                      f"methods.prepare_model?)")
            shaped = module.with_layout(entry)
            if shaped is not module:
                replace_module(model, name, shaped)
    return model


def _method_layer(module: nn.Module, entry: dict[str, Any]) -> Optional[nn.Module]:
    from dist_lowrank.methods import layer_for_layout

    return layer_for_layout(module, entry)


def check_layout(model: nn.Module, layout: dict[str, dict[str, Any]]) -> None:
    """The live model has exactly the saved layout; otherwise name the first layer that differs."""
    live = layout_of(model)
    for name in sorted(set(live) | set(layout)):
        if live.get(name) != layout.get(name):
            raise CheckpointError(f"layout.{name}: checkpoint has {layout.get(name)}, model has {live.get(name)}")


def param_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Global shape of every parameter (ZeRO-3 keeps it in ds_shape; FSDP2's DTensor reports it)."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}


def check_param_shapes(model: nn.Module, saved: dict[str, list[int]]) -> None:
    """Every saved parameter exists with the saved shape: a mismatch names the parameter (and so the layer)
    before any engine tries to load tensors it cannot place."""
    if not saved:
        return
    live = param_shapes(model)
    for name in sorted(set(live) | set(saved)):
        if live.get(name) != saved.get(name):
            raise CheckpointError(f"param_shapes.{name}: checkpoint has {saved.get(name)}, the model built from "
                                  f"the manifest's layout has {live.get(name)}")
