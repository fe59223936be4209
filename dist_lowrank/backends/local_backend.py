"""One process, no wrapper: the reference every distributed backend is compared with.

Also the base of the DDP backend: with replicated weights a reshard (reshape.pipeline: factors computed once, by
the layer's owner rank, and broadcast) ends in module surgery on every rank plus a new optimizer that takes over
the state of every untouched parameter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from dist_lowrank.backends.base import Backend
from dist_lowrank.backends.optim_state import (group_hyperparams, install_states, rebuild_optimizer,
                                               restore_group_hyperparams, snapshot_state, transplant_state)
from dist_lowrank.backends.param_groups import (GroupLayout, OptimizerSpec, SchedulerSpec, bind_scheduler,
                                                first_optimizer, optimizer_recipe)
from dist_lowrank.coordinator import Coordinator
from dist_lowrank.errors import CheckpointError
from dist_lowrank.faults import maybe_fault
from dist_lowrank.reshape.change import Keep, ShapeChange
from dist_lowrank.reshape.materialize import materialize
from dist_lowrank.shard_view import ShardView, replicated_view
from dist_lowrank.surgery import replace_module

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class LocalBackend(Backend):
    """Plain module + torch optimizer; reshards by module surgery on the (replicated) module."""

    name = "local"

    def __init__(self, model: nn.Module, optimizer_factory: OptimizerSpec,
                 scheduler_factory: Optional[SchedulerSpec] = None,
                 param_groups: Optional[list[dict[str, Any]]] = None) -> None:
        """optimizer_factory: a callable params -> optimizer, or an optimizer instance over `model`'s
        parameters (its param groups are kept); scheduler_factory: a callable optimizer -> scheduler, or a
        scheduler instance driving that instance. param_groups: a checkpoint's saved layout
        (`engine_meta()["param_groups"]`) for a resumed run."""
        self.module = model
        self.optimizer_factory = optimizer_recipe(optimizer_factory)
        saved = GroupLayout.from_meta(param_groups) if param_groups else None
        self.optimizer, self.layout, origins = first_optimizer(optimizer_factory, dict(model.named_parameters()), saved)
        given = optimizer_factory if isinstance(optimizer_factory, torch.optim.Optimizer) else None
        self.scheduler = bind_scheduler(scheduler_factory, self.optimizer, given, origins)
        self.model = self.wrap(model)

    def wrap(self, module: nn.Module) -> nn.Module:
        """The object the training loop calls (DDP overrides this)."""
        return module

    def unwrapped_model(self) -> nn.Module:
        return self.module

    def param_views(self, names: list[str]) -> list[ShardView]:
        """Every rank holds every parameter: replicated views (the monitor spreads layers over ranks)."""
        params = dict(self.module.named_parameters())
        return [replicated_view(name, params[name]) for name in names]

    # -- primitives of the reshape pipeline ------------------------------------------------------------
    def gather(self, param: torch.Tensor) -> torch.Tensor:
        """Every rank holds every parameter."""
        return param.detach()

    @property
    def held_states(self) -> dict:
        """The per-parameter optimizer states this rank keeps (here: all of them)."""
        return self.optimizer.state

    def full_state(self, param: torch.Tensor) -> Optional[dict[str, Any]]:
        state = self.held_states.get(param)
        return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()} if state else None

    def write(self, param: torch.Tensor, value: torch.Tensor, state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """The replica on every rank; the moments where this rank keeps them (the same full tensors everywhere)."""
        with torch.no_grad():
            param.copy_(value.reshape(param.shape))
        held = self.held_states.get(param)
        for key, full in (state or {}).items():
            if held and key in held:
                held[key].copy_(full.reshape(held[key].shape))

    def change_names(self, change: ShapeChange) -> tuple[dict[str, nn.Module], set[str], dict[str, list[str]]]:
        """The module's submodules before the change, the names of the parameters it replaces (its Keep leaves
        stay), and per layer with "companion" parameters the old parameter names (the groups to rebase)."""
        old_modules = dict(self.module.named_modules())
        layers = {l.name: [f"{l.name}.{leaf}" for leaf, _ in old_modules[l.name].named_parameters()] for l in change.layers}
        kept = {f"{l.name}.{leaf}" for l in change.layers for leaf, p in l.params.items() if isinstance(p.value, Keep)}
        changed = {name for olds in layers.values() for name in olds} - kept
        rebased = {l.name: layers[l.name] for l in change.layers if any(p.group == "companion" for p in l.params.values())}
        return old_modules, changed, rebased

    def swap_layers(self, change: ShapeChange, modules: dict[str, nn.Module], values: dict[str, torch.Tensor],
                    old_modules: dict[str, nn.Module]) -> None:
        """Every changed layer replaced in the replicated module by its new one, on the old layer's device."""
        for layer in change.layers:
            old = old_modules[layer.name]
            device = next(old.parameters()).device
            replace_module(self.module, layer.name, materialize(layer, modules[layer.name], old, device, values))

    def rebuild(self, change: ShapeChange, modules: dict[str, nn.Module], values: dict[str, torch.Tensor],
                states: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Module surgery on every rank (the same factors everywhere), then a new optimizer over the new parameters
        with every untouched parameter's state. "companion" parameters join their layer's group, or — with
        lr_scale != 1 — a companion group with the scaled lr (torch's optimizers keep a step per parameter, so no
        other reason for a group of their own); "inherit" ones keep their name, group and step."""
        old_modules, changed, rebased = self.change_names(change)
        # Local work only from here to the wrap (DDP broadcasts there): a failure on any rank is shared first.
        with Coordinator().shared_failure(f"{change.kind} rebuild (module surgery, optimizer transplant)"):
            untouched = {n: p for n, p in self.module.named_parameters() if n not in changed}
            snapshot = snapshot_state(self.optimizer, untouched)
            self.layout.refresh(self.optimizer.param_groups)
            scheduler = self.scheduler
            self.release()
            self.swap_layers(change, modules, values, old_modules)
            del old_modules, untouched
            maybe_fault("rebuild")
            named = dict(self.module.named_parameters())
            companions = bool(rebased) and change.lr_scale != 1.0
            origins = None
            if rebased:
                self.layout, origins = self.layout.rebase(rebased, named, companions=companions,
                                                          lr_scale=change.lr_scale)
            self.optimizer = rebuild_optimizer(self.optimizer_factory, self.layout, named, snapshot, scheduler,
                                               origins if companions else None)
            install_states(self.optimizer, named, states)
            self.scheduler = scheduler
        self.model = self.wrap(self.module)
        return {}

    # -- checkpoints: plain state dicts keyed by parameter name (any world size loads them) ----------
    STATE_FILE = "state.pt"

    def engine_meta(self) -> dict[str, Any]:
        """The param-group layout by name (a resumed run passes it back as `param_groups=`)."""
        self.layout.refresh(self.optimizer.param_groups)
        return {"param_groups": self.layout.to_meta()}

    def save_state(self, directory: Path, manifest_json: str) -> None:
        """Rank 0 writes module state, optimizer state by parameter name, group hyperparameters, scheduler."""
        if Coordinator().rank != 0:
            return
        named = dict(self.module.named_parameters())
        torch.save({"manifest": manifest_json, "model": self.module.state_dict(),
                    "optimizer": snapshot_state(self.optimizer, named, copy=False),
                    "param_groups": group_hyperparams(self.optimizer),
                    "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None},
                   Path(directory) / self.STATE_FILE)

    def load_state(self, directory: Path, engine_meta: Optional[dict[str, Any]] = None) -> None:
        path = Path(directory) / self.STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (checkpoint written by another backend?)")
        state = torch.load(path, map_location=next(self.module.parameters()).device, weights_only=False)
        load_module_state(self.module, state["model"], path)
        named = dict(self.module.named_parameters())
        self.optimizer.state.clear()
        try:
            transplant_state(self.optimizer, named, state["optimizer"])
            restore_group_hyperparams(self.optimizer, state["param_groups"])
        except Exception as exc:
            raise CheckpointError(f"{path}: optimizer state does not fit the model: {exc}") from exc
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def export_fp32(self) -> Optional[dict[str, torch.Tensor]]:
        if Coordinator().rank != 0:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}

    def release(self) -> None:
        """Drop the wrapper and optimizer that reference the old parameters."""
        self.model = None
        self.optimizer = None
        self.scheduler = None


def load_module_state(module: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """module.load_state_dict, with a shape or key mismatch reported in one line naming the first tensor."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source}: keys differ from the model: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]} (built with another layout?)")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)} in the checkpoint, "
                                  f"{tuple(own[key].shape)} in the model")
    module.load_state_dict(state)
