"""FSDP2 (`fully_shard`): reshard by rebuilding the sharded model with the new layer shapes.

FSDP2 silently ignores a new nn.Parameter assigned after `fully_shard` (the next forward restores the
old shard), so shapes change only through a rebuild: the user gives `model_fn` (how to build the
model) and `parallelize_fn` (how to shard it, torchtitan style). The reshape pipeline gathers each changed layer
on its own (`gather`: `full_tensor()`, every rank takes part) and computes the new full values; `rebuild` then:
1. builds the new model on the meta device with every change's builders replayed, sharded by `parallelize_fn`,
   then materialized (`to_empty`): untouched parameters copy their local shard from the old DTensor
   (same mesh and placement ⇒ same shard), changed ones take their own chunk of the full values;
2. a new optimizer takes over the state of every untouched parameter (local shards, bit for bit); changed ones
   get their carried state sharded the same way, or none (zero moments, their own step count);
3. the old model and optimizer are dropped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from dist_lowrank.backends.base import Backend
from dist_lowrank.backends.optim_state import rebuild_optimizer, snapshot_state
from dist_lowrank.backends.param_groups import (GroupLayout, OptimizerSpec, SchedulerSpec, bind_scheduler,
                                                first_optimizer, optimizer_recipe)
from dist_lowrank.coordinator import Coordinator
from dist_lowrank.device import default_device
from dist_lowrank.errors import CheckpointError, DistLowRankError
from dist_lowrank.faults import maybe_fault
from dist_lowrank.reshape.change import carry_attrs
from dist_lowrank.shard_view import ShardView, replicated_view
from dist_lowrank.surgery import clean_name, replace_module


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (collective for a DTensor: every rank must call it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class FSDP2Backend(Backend):
    """A model sharded with `fully_shard` by the user's `parallelize_fn`."""

    name = "fsdp2"
    shards_parameters = True
    shards_optimizer_state = True

    def __init__(self, model_fn: Callable[[], nn.Module], parallelize_fn: Callable[[nn.Module], nn.Module],
                 optimizer_factory: OptimizerSpec, scheduler_factory: Optional[SchedulerSpec] = None,
                 model: Optional[nn.Module] = None, param_groups: Optional[list[dict[str, Any]]] = None) -> None:
        """optimizer_factory: a callable params -> optimizer, or an optimizer instance over the parameters of
        `model` (already sharded by `parallelize_fn`; its param groups are kept); scheduler_factory: a callable
        optimizer -> scheduler or a scheduler instance driving that optimizer. param_groups: a checkpoint's
        saved layout (`engine_meta()["param_groups"]`) for a resumed run."""
        self.model_fn, self.parallelize_fn = model_fn, parallelize_fn
        self.optimizer_factory = optimizer_recipe(optimizer_factory)
        if isinstance(optimizer_factory, torch.optim.Optimizer) and model is None:
            raise DistLowRankError("optimizer_factory: an optimizer instance needs the sharded `model=` it was "
                                   "built over (or pass a factory params -> optimizer)")
        module = model if model is not None else model_fn()
        if any(isinstance(p, DTensor) for p in module.parameters()):
            self.model = module  # sharded by the user already (the optimizer instance was built over its shards)
        else:
            self.model = parallelize_fn(module.to(default_device())) or module
        saved = GroupLayout.from_meta(param_groups) if param_groups else None
        self.optimizer, self.layout, origins = first_optimizer(optimizer_factory, dict(self.model.named_parameters()), saved)
        given = optimizer_factory if isinstance(optimizer_factory, torch.optim.Optimizer) else None
        self.scheduler = bind_scheduler(scheduler_factory, self.optimizer, given, origins)
        # every structural change so far (layer name -> builder from the meta module), replayed on rebuilds
        self.replacements: list[tuple[str, Callable[[nn.Module], nn.Module]]] = []

    def param_views(self, names: list[str]) -> list[ShardView]:
        """Row shards (`Shard(0)`) of each parameter, offsets from torch's own placement arithmetic."""
        params = dict(self.model.named_parameters())
        views = []
        for name in names:
            param = params[name]
            global_shape = tuple(param.shape)
            rows, cols = global_shape[0], int(torch.Size(global_shape[1:]).numel())
            if isinstance(param, DTensor):
                local = param.to_local().detach()
                views.append(ShardView(name, (rows, cols), _row_offset(name, param, local) * cols, local.reshape(-1)))
            else:
                views.append(replicated_view(name, param))
        return views

    # -- primitives of the reshape pipeline ------------------------------------------------------------
    def gather(self, param: torch.Tensor) -> torch.Tensor:
        """The whole parameter (`full_tensor()`: every rank takes part)."""
        return _full(param).detach()

    def full_state(self, param: torch.Tensor) -> Optional[dict[str, Any]]:
        """The parameter's optimizer state with every DTensor gathered (collective)."""
        state = self.optimizer.state.get(param)
        if not state:
            return None
        return {k: _full(v).detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}

    def values_dtype(self, param: torch.Tensor) -> torch.dtype:
        return _local(param).dtype

    def write(self, param: torch.Tensor, value: torch.Tensor, state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """This rank's row shard of each full tensor copied into the local shards (no communication)."""
        with torch.no_grad():
            _local(param).copy_(_local(_shard_like(value.reshape(param.shape), param)))
            held = self.optimizer.state.get(param)
            for key, full in (state or {}).items():
                if held and key in held:
                    _local(held[key]).copy_(_local(_shard_like(full.reshape(param.shape), held[key])))

    def row_shard(self, param: torch.Tensor) -> Optional[tuple[torch.Tensor, int]]:
        if not isinstance(param, DTensor):
            return None
        local = param.to_local()
        try:
            first = _row_offset("a row-sharded parameter", param, local)
        except DistLowRankError:  # another dim sharded, HSDP, TP: not row blocks; the caller gathers instead
            return None
        return local.reshape(local.shape[0], -1), first

    def local_state(self, param: torch.Tensor) -> Optional[dict[str, torch.Tensor]]:
        state = self.optimizer.state.get(param)
        if not state:
            return None
        return {k: _local(v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0}

    def write_rows(self, param: torch.Tensor, rows: torch.Tensor,
                   state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """No communication: every tensor here is this rank's block already."""
        with torch.no_grad():
            local = _local(param)
            local.copy_(rows.reshape(local.shape))
            held = self.optimizer.state.get(param)
            for key, value in (state or {}).items():
                if held and key in held:
                    _local(held[key]).copy_(value.reshape(local.shape))

    def rebuild(self, change: Any, modules: dict[str, nn.Module], values: dict[str, torch.Tensor],
                states: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """A new sharded model from the meta skeleton with the change's builders replayed (every change so far),
        its local shards filled; the optimizer rebuilt. The built `modules` are not used: FSDP2 needs the whole
        model rebuilt and sharded by `parallelize_fn`."""
        for layer in change.layers:
            self.replacements.append((layer.name, layer.build))
        replaced = sorted(l.name for l in change.layers if any(p.group == "companion" for p in l.params.values()))
        # Local work only from here on (skeleton, fully_shard on meta, shard copies, optimizer): shared failure.
        with Coordinator().shared_failure(f"{change.kind} rebuild (sharded model, optimizer transplant)"):
            self._rebuild(values, states, replaced, {l.name for l in change.layers},
                          lr_scale=change.lr_scale if replaced else 1.0)
        return {}

    def _rebuild(self, sources: dict[str, torch.Tensor], full_states: dict[str, dict],
                 replaced: list[str], changed_layers: set[str], lr_scale: float = 1.0) -> None:
        """New sharded model from the skeleton: untouched shards copied, `sources` distributed, optimizer
        state carried (untouched: local shards bit for bit; `full_states`: distributed), the param groups of
        the `replaced` layers' parameters passed on to their successors. The old model and optimizer are
        dropped; the scheduler is re-bound."""
        old = self.model
        new = self._build_skeleton()
        maybe_fault("rebuild")
        self._materialize(new, old, sources)
        carry_attrs(old, new, skip=changed_layers)  # Python-side shape state (a rank grown inside its capacity)
        old_named = dict(old.named_parameters())
        new_named = dict(new.named_parameters())
        untouched = {n: p for n, p in old_named.items() if n in new_named and n not in sources}
        snapshot = snapshot_state(self.optimizer, untouched, copy=False)  # the old optimizer is dropped next
        self.layout.refresh(self.optimizer.param_groups)
        layers = {layer: [n for n in old_named if n.startswith(layer + ".")] for layer in replaced}
        scheduler = self.scheduler
        self.model = self.optimizer = self.scheduler = None
        del old, old_named, untouched
        self.model = new
        companions = lr_scale != 1.0  # a factor lr of its own needs a group of its own
        self.layout, origins = self.layout.rebase(layers, new_named, companions=companions, lr_scale=lr_scale)
        self.optimizer = rebuild_optimizer(self.optimizer_factory, self.layout, new_named, snapshot, scheduler,
                                           origins if companions else None)
        self.scheduler = scheduler
        for name, state in full_states.items():
            param = new_named[name]
            self.optimizer.state[param] = {key: _shard_like(_shaped(value, param), param) for key, value in state.items()}

    # -- checkpoints: torch.distributed.checkpoint (sharded files, resharded on load) ------------------
    def save_state(self, directory: Path, manifest_json: str) -> None:
        """DCP save of model + optimizer state keyed by parameter name; parameters that have no optimizer
        state yet (factors before their first step) are listed in the manifest's engine meta."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd, "manifest": manifest_json}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        dcp.save(state, checkpoint_id=str(directory))

    def engine_meta(self) -> dict[str, Any]:
        """Parameters without optimizer state yet, and the param-group layout by name (a resumed run passes
        it back as `param_groups=`)."""
        self.layout.refresh(self.optimizer.param_groups)
        return {"stateless_params": sorted(n for n, p in self.model.named_parameters()
                                           if p.requires_grad and not self.optimizer.state.get(p)),
                "param_groups": self.layout.to_meta()}

    def load_state(self, directory: Path, engine_meta: Optional[dict[str, Any]] = None) -> None:
        """DCP load into this (possibly differently sized) sharded model; parameters saved without optimizer
        state get none here either, so Adam starts them lazily exactly as the uninterrupted run does."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        stateless = set((engine_meta or {}).get("stateless_params", []))
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)  # initializes every param's state
        optim_sd["state"] = {k: v for k, v in optim_sd["state"].items() if k not in stateless}
        state = {"model": model_sd, "optim": optim_sd}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        try:
            dcp.load(state, checkpoint_id=str(directory))
        except Exception as exc:  # DCP reports shape/key mismatches as a CheckpointException per rank
            raise CheckpointError(f"{directory}: cannot load into this model: {str(exc).splitlines()[0][:300]}") from exc
        # strict=False only lets the stateless parameters through: dcp.load above already required every
        # model key and every other parameter's optimizer state to be in the checkpoint.
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=not stateless))
        for name, param in self.model.named_parameters():
            if name in stateless:
                self.optimizer.state.pop(param, None)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def export_fp32(self) -> Optional[dict[str, torch.Tensor]]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return {k: v.float().clone() for k, v in full.items()}

    def _build_skeleton(self) -> nn.Module:
        """model_fn on the meta device, every change's builder so far replayed in order, then sharded. Replacements are
        named as in the sharded model; model_fn's model has no wrapper prefixes yet (parallelize_fn adds
        them, e.g. checkpoint_wrapper's `_checkpoint_wrapped_module.`), hence `clean_name`."""
        with torch.device("meta"):
            skeleton = self.model_fn()
            for name, build in self.replacements:  # in order: a layer changed twice builds on its first change
                replace_module(skeleton, clean_name(name), build(skeleton.get_submodule(clean_name(name))))
        return self.parallelize_fn(skeleton) or skeleton

    @torch.no_grad()
    def _materialize(self, new: nn.Module, old: nn.Module, sources: dict[str, torch.Tensor]) -> None:
        """Allocate the sharded skeleton and fill every local shard (no full model anywhere)."""
        new.to_empty(device=default_device())
        old_params = dict(old.named_parameters())
        for name, param in new.named_parameters():
            if name in sources:
                _local(param).copy_(_local(_shard_like(sources[name].reshape(param.shape), param)))
                continue
            if name not in old_params:
                raise DistLowRankError(f"{name}: new parameter with no source")
            src, dst = _local(old_params[name]), _local(param)
            if src.shape != dst.shape:
                raise DistLowRankError(f"{name}: local shard {tuple(src.shape)} != rebuilt {tuple(dst.shape)}")
            dst.copy_(src)
        old_buffers = dict(old.named_buffers())
        for name, buf in new.named_buffers():
            if name in old_buffers:
                buf.copy_(old_buffers[name])


def _row_offset(name: str, param: DTensor, local: torch.Tensor) -> int:
    """First global row of this rank's piece. Only plain FSDP's layout is a row block of the matrix:
    `Shard(0)` on a 1-D mesh spanning the default group (the one the monitor all-reduces over). A
    `shard_placement_fn` that shards another dim, HSDP or TP meshes are refused by name rather than
    read as rows; uneven chunks (FSDP2 pads internally) come out right from torch's own arithmetic."""
    mesh, placements = param.device_mesh, tuple(param.placements)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if mesh.ndim != 1 or mesh.size() != world or placements != (Shard(0),):
        raise DistLowRankError(f"{name}: placements {placements} on a {tuple(mesh.shape)} mesh; "
                               f"shard views need Shard(0) on a 1-D mesh of all {world} ranks")
    shape, offset = compute_local_shape_and_global_offset(tuple(param.shape), mesh, placements)
    if tuple(shape) != tuple(local.shape):
        raise DistLowRankError(f"{name}: local shard {tuple(local.shape)} != torch's layout {tuple(shape)}")
    return int(offset[0])


def _shaped(value: Any, param: torch.Tensor) -> Any:
    """A full state tensor in its parameter's (global) shape: projected factor states come as matrices."""
    return value.reshape(param.shape) if isinstance(value, torch.Tensor) and value.dim() > 0 else value


def _shard_like(value: Any, param: torch.Tensor) -> Any:
    """A full tensor cut like `param` (this rank's local shard as a DTensor); scalars pass through."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    local = _local(param)
    value = value.to(device=local.device, dtype=local.dtype if value.is_floating_point() else value.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    return value


def shard_each_layer(model: nn.Module) -> nn.Module:
    """A default `parallelize_fn`: `fully_shard` every submodule that owns parameters, then the root
    (each layer's parameters are gathered only around its own forward/backward)."""
    from torch.distributed.fsdp import fully_shard

    for name, module in list(model.named_modules()):
        if name and any(True for _ in module.parameters(recurse=False)):
            fully_shard(module)
    return fully_shard(model)
