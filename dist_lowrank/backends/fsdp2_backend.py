"""FSDP2 (`fully_shard`): reshard by rebuilding the sharded model with the new layer shapes.

FSDP2 silently ignores a new nn.Parameter assigned after `fully_shard` (the next forward restores the
old shard), so shapes change only through a rebuild: the user gives `model_fn` (how to build the
model) and `parallelize_fn` (how to shard it, torchtitan style). At a switch:
1. each targeted layer is gathered on its own (`full_tensor()`, every rank takes part), its owner rank
   runs the SVD and the factors are broadcast (no rank ever holds more than one full layer);
2. the new model is built on the meta device, factorized structurally, sharded by `parallelize_fn`,
   then materialized (`to_empty`): untouched parameters copy their local shard from the old DTensor
   (same mesh and placement ⇒ same shard), factors take their own chunk of the broadcast factors;
3. a new optimizer takes over the state of every untouched parameter (local shards, bit for bit);
   factors start with no state (zero moments, their own step count);
4. the old model and optimizer are dropped.
"""
from __future__ import annotations

import gc
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from dist_lowrank.backends.base import Backend
from dist_lowrank.backends.local_backend import peak_rss_mb
from dist_lowrank.backends.optim_state import embed_state, rebuild_optimizer, snapshot_state
from dist_lowrank.backends.param_groups import (GroupLayout, OptimizerSpec, SchedulerSpec, bind_scheduler,
                                                first_optimizer, optimizer_recipe)
from dist_lowrank.coordinator import Coordinator
from dist_lowrank.device import comm_device, default_device
from dist_lowrank.errors import CheckpointError, DistLowRankError
from dist_lowrank.faults import maybe_fault
from dist_lowrank.layers import InRankLinear, empty_factorized
from dist_lowrank.plan import Plan
from dist_lowrank.reshard import factorize_spread, layer_fetcher, projected_factor_states
from dist_lowrank.shard_view import ShardView, replicated_view
from dist_lowrank.surgery import clean_name, count_parameters, replace_module


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (collective for a DTensor: every rank must call it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class FSDP2Backend(Backend):
    """A model sharded with `fully_shard` by the user's `parallelize_fn`."""

    name = "fsdp2"
    shards_parameters = True

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
        self.replacements: dict[str, Callable[[nn.Module], nn.Module]] = {}

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

    def execute(self, plan: Plan) -> dict[str, Any]:
        """Switch (factorize plan.ranks) or InRank growth past capacity (plan.kind == "grow").
        Measured as a whole: gathers, SVDs, broadcasts, rebuild, state transplant."""
        start, rss_before = time.perf_counter(), peak_rss_mb()
        params_before = count_parameters(self.model)
        if plan.kind == "grow":
            sources, states = self._grow_sources(plan)
            layers, replaced = len(plan.capacities), []  # grown U, V keep their names (and groups)
        else:
            sources, states = self._switch_sources(plan)
            layers, replaced = len(plan.ranks), sorted(plan.ranks)
        # Local work only from here on (skeleton, fully_shard on meta, shard copies, optimizer): shared failure.
        with Coordinator().shared_failure(f"{plan.kind} rebuild (sharded model, optimizer transplant)"):
            self._rebuild(sources, states, replaced, lr_scale=plan.lr_scale if plan.kind != "grow" else 1.0)
        del sources, states
        gc.collect()
        return {"seconds": time.perf_counter() - start, "params_before": params_before,
                "params_after": count_parameters(self.model), "layers": layers, "peak_rss_mb": peak_rss_mb(),
                "peak_rss_growth_mb": peak_rss_mb() - rss_before}

    def _switch_sources(self, plan: Plan) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
        """Full factors (and biases) of every switched layer: one layer gathered at a time, SVDs spread;
        with factor_moments: projected, their full projected states too (W's DTensor moments gathered one
        layer at a time on every rank; `_rebuild` keeps each rank's shard)."""
        modules = dict(self.model.named_modules())
        names = sorted(plan.ranks)
        biases: dict[str, Optional[torch.Tensor]] = {}
        fetch = layer_fetcher(modules, _full, biases)
        dtype = _local(next(modules[names[0]].parameters())).dtype
        factors = factorize_spread(names, plan.ranks, fetch, dtype=dtype, device=comm_device())
        sources: dict[str, torch.Tensor] = {}
        for name in names:
            a, b = factors[name]
            sources[f"{name}.first.weight"], sources[f"{name}.second.weight"] = b, a
            if biases[name] is not None:
                sources[f"{name}.second.bias"] = biases[name]
            self.replacements[name] = partial(_factorized_like, rank=plan.ranks[name])
        states: dict[str, dict] = {}
        if plan.factor_moments == "projected":
            optimizer = self.optimizer

            def read(_name: str, param: torch.Tensor) -> Optional[dict]:
                state = optimizer.state.get(param)
                return {k: _full(v).detach() if isinstance(v, torch.Tensor) else v for k, v in state.items()} if state else None

            states = projected_factor_states(names, modules, factors, read)
        return sources, states

    def _grow_sources(self, plan: Plan) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
        """InRank layers past capacity: full U, V (small) and their moments, grown."""
        modules = dict(self.model.named_modules())
        sources: dict[str, torch.Tensor] = {}
        states: dict[str, dict] = {}
        for name in sorted(plan.capacities):
            layer, capacity = modules[name], plan.capacities[name]
            u, v = InRankLinear.grown_factors(_full(layer.u).detach(), _full(layer.v).detach(), capacity,
                                              layer.seed + capacity)
            sources[f"{name}.u"], sources[f"{name}.v"] = u, v
            for pname, param, grown in ((f"{name}.u", layer.u, u), (f"{name}.v", layer.v, v)):
                state = self.optimizer.state.get(param)
                if state:
                    states[pname] = embed_state({key: _full(value) for key, value in state.items()}, grown.shape)
            self.replacements[name] = partial(_inrank_like, width=plan.ranks[name], capacity=capacity)
        return sources, states

    def _rebuild(self, sources: dict[str, torch.Tensor], full_states: dict[str, dict],
                 replaced: list[str], lr_scale: float = 1.0) -> None:
        """New sharded model from the skeleton: untouched shards copied, `sources` distributed, optimizer
        state carried (untouched: local shards bit for bit; `full_states`: distributed), the param groups of
        the `replaced` layers' parameters passed on to their successors. The old model and optimizer are
        dropped; the scheduler is re-bound."""
        old = self.model
        new = self._build_skeleton()
        maybe_fault("rebuild")
        self._materialize(new, old, sources)
        old_inrank = {n: m for n, m in old.named_modules() if isinstance(m, InRankLinear)}
        for name, module in new.named_modules():  # widths grown within capacity live on the modules
            if isinstance(module, InRankLinear) and name in old_inrank and name not in full_states_layers(full_states):
                module.grow(max(module.rank, old_inrank[name].rank))
        old_named = dict(old.named_parameters())
        new_named = dict(new.named_parameters())
        untouched = {n: p for n, p in old_named.items() if n in new_named and n not in sources}
        snapshot = snapshot_state(self.optimizer, untouched, copy=False)  # the old optimizer is dropped next
        self.layout.refresh(self.optimizer.param_groups)
        layers = {layer: [n for n in old_named if n.startswith(layer + ".")] for layer in replaced}
        scheduler = self.scheduler
        self.model = self.optimizer = self.scheduler = None
        del old, old_named, untouched, old_inrank
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
        """model_fn on the meta device, every replacement so far replayed, then sharded. Replacements are
        named as in the sharded model; model_fn's model has no wrapper prefixes yet (parallelize_fn adds
        them, e.g. checkpoint_wrapper's `_checkpoint_wrapped_module.`), hence `clean_name`."""
        with torch.device("meta"):
            skeleton = self.model_fn()
            meta_modules = dict(skeleton.named_modules())
            for name, build in self.replacements.items():
                replace_module(skeleton, clean_name(name), build(meta_modules[clean_name(name)]))
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


def full_states_layers(full_states: dict[str, dict]) -> set[str]:
    """Layer names whose parameters are rebuilt from full states (their width comes from the plan)."""
    return {name.rpartition(".")[0] for name in full_states}


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


def _factorized_like(dense: nn.Module, rank: int) -> nn.Module:
    return empty_factorized(dense, rank, device="meta", dtype=next(dense.parameters()).dtype)


def _inrank_like(old: InRankLinear, width: int, capacity: int) -> InRankLinear:
    return InRankLinear(old.in_features, old.out_features, width, capacity, old.w0_mode, old.bias is not None,
                        seed=old.seed)


def shard_each_layer(model: nn.Module) -> nn.Module:
    """A default `parallelize_fn`: `fully_shard` every submodule that owns parameters, then the root
    (each layer's parameters are gathered only around its own forward/backward)."""
    from torch.distributed.fsdp import fully_shard

    for name, module in list(model.named_modules()):
        if name and any(True for _ in module.parameters(recurse=False)):
            fully_shard(module)
    return fully_shard(model)
