"""DeepSpeed ZeRO stages 0-3 as a Backend: an engine that can be rebuilt with new layer shapes, keeping state.

Neither DeepSpeed nor torch changes a parameter's shape in place. The pipeline (reshape/pipeline.py) gathers
each changed layer's fp32 master (`gather`) and moments (`full_state`) and computes the new values; `rebuild`
then
1. snapshots every untouched parameter's fp32 master and Adam moments (ds_state: ZeRO-3 this rank's own
   partition, no communication; ZeRO-1/2 the full tensors, since the flat partitions are laid out anew), the
   engine's counters, loss scale (ds_loss_scale) and scheduler;
2. destroys the old engine and what `destroy()` leaves behind (ds_cleanup) and swaps the new modules in;
3. builds a new `deepspeed.initialize` with a client optimizer from the user's param-group layout
   (`param_groups.GroupLayout`, by name, hyper-parameters as the scheduler left them). ZeRO keeps one Adam
   step per flat group, so new factors go into *companion* groups with their source's hyper-parameters, at
   step 0 (zero moments, like torch's per-parameter Adam) while every other group keeps its step; the
   scheduler instance is re-bound at its position;
4. writes the snapshot back bit for bit and the new values and moments in (ds_state).
Checkpoints are DeepSpeed's own format (ds_checkpoint). Local stretches end in `Coordinator.shared_failure`,
so one rank's failure there ends every rank with the same named error; a failure *inside* one of DeepSpeed's
own collectives (gathers, `deepspeed.initialize`) is left to the process-group timeout.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from dist_lowrank.backends import ds_checkpoint, ds_loss_scale, ds_state
from dist_lowrank.backends.base import Backend
from dist_lowrank.backends.ds_cleanup import release_engine
from dist_lowrank.backends.ds_master_views import master_view
from dist_lowrank.backends.ds_runtime import init_deepspeed_distributed
from dist_lowrank.backends.param_groups import (GroupLayout, OptimizerSpec, ParamGroup, SchedulerSpec, first_optimizer,
                                                is_scheduler_instance, optimizer_recipe, rebind_scheduler,
                                                rebuilt_optimizer)
from dist_lowrank.coordinator import Coordinator
from dist_lowrank.errors import CheckpointError, DistLowRankError
from dist_lowrank.faults import maybe_fault
from dist_lowrank.reshape.materialize import materialize
from dist_lowrank.shard_view import ShardView, replicated_view
from dist_lowrank.surgery import count_parameters, replace_module

COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


class DeepSpeedBackend(Backend):
    """A DeepSpeed engine (ZeRO-0/1/2/3) that can be rebuilt with new layer shapes."""

    name = "deepspeed"
    owns_gradients = True

    def __init__(self, model: nn.Module, config: dict, optimizer_factory: Optional[OptimizerSpec] = None,
                 scheduler_factory: Optional[SchedulerSpec] = None, model_fn: Optional[Callable] = None,
                 group_names: Optional[list[list[str]]] = None, param_groups: Optional[list[dict]] = None,
                 **initialize_kwargs: Any) -> None:
        """optimizer_factory: a torch optimizer instance over `model`'s parameters (used as the first client
        optimizer, its param groups kept) or a callable params -> optimizer; None = the ds_config's optimizer
        (one group). scheduler_factory: a scheduler instance driving that optimizer, or a callable optimizer ->
        scheduler. param_groups: a checkpoint's saved layout (`engine_meta()["param_groups"]`; ZeRO's optimizer
        checkpoint is per group); group_names: the older, names-only form of it."""
        init_deepspeed_distributed()
        self.config = dict(config)
        self.stage = int(self.config.get("zero_optimization", {}).get("stage", 0))
        self.shards_parameters = self.stage == 3
        self.shards_optimizer_state = self.stage >= 1
        self.optimizer_factory = optimizer_recipe(optimizer_factory)
        self.initialize_kwargs = initialize_kwargs
        named = dict(model.named_parameters())
        saved = (GroupLayout.from_meta(param_groups) if param_groups else
                 GroupLayout([ParamGroup(list(g)) for g in group_names]) if group_names
                 else None)
        if saved is not None:
            listed = {n for g in saved.groups for n in g.names}
            if not listed <= set(named):
                raise CheckpointError(f"param groups: saved layout names {sorted(listed - set(named))[:3]} "
                                      f"that the model does not have")
        origins = None
        if optimizer_factory is None:
            client, self.layout = None, saved or GroupLayout.single(named)
        else:
            client, self.layout, origins = first_optimizer(optimizer_factory, named, saved)
        scheduler = scheduler_factory
        if is_scheduler_instance(scheduler) and getattr(scheduler, "optimizer", client) is not client:
            if not isinstance(optimizer_factory, torch.optim.Optimizer) or scheduler.optimizer is not optimizer_factory:
                raise DistLowRankError("lr_scheduler: the instance drives another optimizer than the one passed as "
                                       "`optimizer` (build the scheduler on that optimizer, or pass a factory)")
            # resumed from a saved layout: the user's scheduler moves to the optimizer built from it, each saved
            # group (companions included) continuing the user's group that holds its parameters
            instance, user_groups = scheduler, len(optimizer_factory.param_groups)
            scheduler = lambda opt: rebind_scheduler(instance, opt, origins, user_groups)
        self.engine, self.dataloader = self._initialize(model, client, scheduler, first=True)

    @property
    def group_names(self) -> list[list[str]]:
        """The client param groups by parameter name (older manifests store only this)."""
        return [list(g.names) for g in self.layout.groups]

    # -- engine plumbing ---------------------------------------------------------------------------
    def _initialize(self, module: nn.Module, optimizer: Optional[torch.optim.Optimizer], scheduler: Any,
                    first: bool = False):
        import deepspeed

        kwargs = dict(self.initialize_kwargs) if first else {
            k: v for k, v in self.initialize_kwargs.items() if k not in ("training_data", "collate_fn")}
        engine, _, dataloader, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=self.config,
                                                        lr_scheduler=scheduler, **kwargs)
        return engine, dataloader

    @property
    def model(self):
        return self.engine

    @property
    def optimizer(self):
        return self.engine.optimizer

    def unwrapped_model(self) -> nn.Module:
        return self.engine.module

    def backward(self, loss: torch.Tensor) -> None:
        self.note_backward()
        self.engine.backward(loss)

    def note_backward(self) -> None:
        """Remember the fp16 loss scale this backward uses (the scaler may change it at the step after)."""
        self._backward_scale = ds_loss_scale.current_scale(self.engine)

    def backward_scale(self) -> float:
        return getattr(self, "_backward_scale", 1.0)

    def step(self) -> None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            self.link_optimizer_state_once()

    def link_optimizer_state_once(self) -> None:
        """After the first optimizer step of an engine: link ZeRO-1/2's per-parameter state fragments for every
        group (see `ds_state.relink`), so `safe_get_full_optimizer_state` works on all of them."""
        if not getattr(self.engine, "_dist_lowrank_linked", False) and ds_state.group_steps(self.engine)[0] is not None:
            ds_state.relink(self.engine)
            self.engine._dist_lowrank_linked = True  # a mark on the engine: no reference that outlives it

    # -- checkpoints: DeepSpeed's own format (engine.save_checkpoint / load_checkpoint) --------------
    CHECKPOINT_TAG = "engine"
    UNIVERSAL_DIR = "universal"

    def engine_meta(self) -> dict[str, Any]:
        steps = [None if step is None else float(step) for step in ds_state.group_steps(self.engine)]
        self._refresh_layout()
        return {"group_names": self.group_names, "param_groups": self.layout.to_meta(), "zero_stage": self.stage,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1, "group_steps": steps}

    def _refresh_layout(self) -> None:
        """The layout's hyper-parameters from the client optimizer's groups (lr as the scheduler set it)."""
        if self.optimizer_factory is not None:
            self.layout.refresh([{k: v for k, v in g.items() if k != "params"}
                                 for g in ds_state.base_optimizer(self.engine).param_groups])

    def save_state(self, directory: Path, manifest_json: str) -> None:
        ds_checkpoint.save(self.engine, directory, self.CHECKPOINT_TAG, manifest_json)

    @staticmethod
    def needs_universal(engine_meta: Optional[dict[str, Any]]) -> bool:
        return ds_checkpoint.needs_universal(engine_meta)

    def load_state(self, directory: Path, engine_meta: Optional[dict[str, Any]] = None) -> None:
        ds_checkpoint.load(self.engine, self.stage, Path(directory), engine_meta, self.CHECKPOINT_TAG,
                           self.UNIVERSAL_DIR)

    def export_fp32(self) -> Optional[dict[str, torch.Tensor]]:
        """fp32 masters of every parameter (collective under ZeRO-3) plus buffers, on rank 0."""
        module = self.engine.module
        out = {name: ds_state.full_fp32(param) for name, param in module.named_parameters()}
        out.update({name: buf.detach().float().cpu().clone() for name, buf in module.named_buffers()})
        return out if not dist.is_initialized() or dist.get_rank() == 0 else None

    # -- monitor -----------------------------------------------------------------------------------
    def param_views(self, names: list[str]) -> list[ShardView]:
        """ZeRO-3: this rank's flat partition (padding removed); ZeRO-0/1/2: the replicated parameter. Under
        bf16/fp16: this rank's piece of the fp32 master instead (ds_master_views)."""
        params = dict(self.engine.module.named_parameters())
        views = []
        for name in names:
            param = params[name]
            master = master_view(name, param)
            if master is not None:
                views.append(master)
            elif hasattr(param, "ds_tensor"):
                shape = tuple(param.ds_shape)
                numel = int(param.ds_numel)
                part = param.ds_tensor.numel()
                start = min(numel, dist.get_rank() * part)
                end = min(numel, start + part)
                local = param.ds_tensor.detach().reshape(-1)[: end - start]
                views.append(ShardView(name, (shape[0], numel // shape[0]), start, local))
            else:
                views.append(replicated_view(name, param))
        return views

    # -- primitives of the reshape pipeline ------------------------------------------------------------
    def gather(self, param: torch.Tensor) -> torch.Tensor:
        """The full fp32 master (collective under ZeRO-3); a frozen parameter (no master) gathered as it is."""
        return ds_state.full_fp32(param)

    def values_dtype(self, param: torch.Tensor) -> torch.dtype:
        return torch.float32  # the optimizer's masters: what `gather` returns and what the new engine is given

    def full_state(self, param: torch.Tensor) -> Optional[dict[str, Any]]:
        """Full Adam moments of one parameter (`safe_get_full_optimizer_state`: an all-reduce of the fragments on
        ZeRO-1/2, a gather on ZeRO-3); None before the first step or for a frozen parameter. The step is the
        param group's (ZeRO keeps one per flat group), so it is not part of a parameter's state here."""
        if not param.requires_grad or ds_state.group_steps(self.engine)[0] is None:
            return None
        self._link_for_this_step()
        return {k: v.cpu() for k, v in ds_state.full_moments(param).items()}

    def write(self, param: torch.Tensor, value: torch.Tensor, state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """The working copy (ZeRO-3: this rank's partition) and the fp32 master and moments (ds_state)."""
        ds_state.write_param(self.stage, param, value)
        moments = {k: v for k, v in (state or {}).items() if k in ds_state.MOMENTS}
        if param.requires_grad:
            if moments:
                self._link_for_this_step()
            ds_state.write_full(self.stage, {"p": param}, {"p": value}, {"p": moments} if moments else {})

    def _link_for_this_step(self) -> None:
        """Per-parameter moment access (ZeRO-1/2 fragments) linked once per engine and optimizer step."""
        marker = (id(self.engine), getattr(self.engine, "global_steps", None))
        if getattr(self, "_linked_at", None) != marker:
            ds_state.relink(self.engine)
            self._linked_at = marker

    def rebuild(self, change: Any, modules: dict[str, nn.Module], values: dict[str, torch.Tensor],
                states: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """New modules swapped in (Keep parameters are the old, possibly partitioned, objects), a new engine,
        every fp32 master and moment put in place. "companion" parameters go to companion groups: Adam step 0
        (zero moments) or, with projected moments, the source group's step."""
        old_modules = dict(self.engine.module.named_modules())
        replacements = {}
        for layer in change.layers:
            old = old_modules[layer.name]
            replacements[layer.name] = materialize(layer, modules[layer.name], old, next(old.parameters()).device,
                                                   values)
        del old_modules
        params = [p for layer in change.layers for p in layer.params.values()]
        companion = any(p.group == "companion" for p in params)
        projected = any(p.state == "project" for p in params) and bool(states)
        return self._rebuild(replacements, values, states, new_group=companion, lr_scale=change.lr_scale,
                             carry_steps=projected)

    def _rebuild(self, replacements: dict[str, nn.Module], values: dict[str, torch.Tensor],
                 states: dict[str, dict[str, torch.Tensor]], new_group: bool, lr_scale: float = 1.0,
                 carry_steps: bool = False) -> dict[str, Any]:
        """Swap modules, build a new engine, and put every fp32 master and Adam moment in place.

        values: full fp32 masters of the parameters that changed; states: their full moments (absent ⇒ zero).
        Companion groups (new_group) start at step 0, or at their source group's step with carry_steps
        (projected moments); their lr is the source's × lr_scale.
        """
        module = self.engine.module
        params_before = count_parameters(module)
        old_modules = dict(module.named_modules())
        changed = set(values)
        for name, replacement in replacements.items():  # old parameters that do not carry over
            kept_ids = {id(p) for p in replacement.parameters()}
            changed |= {f"{name}.{leaf}" for leaf, p in old_modules[name].named_parameters() if id(p) not in kept_ids}
        untouched = {n: p for n, p in module.named_parameters() if n not in changed}
        layers = {name: [f"{name}.{leaf}" for leaf, _ in old_modules[name].named_parameters()] for name in replacements}
        del old_modules
        steps = ds_state.group_steps(self.engine)
        snapshot = ds_state.snapshot(self.engine, self.stage, untouched, has_state=steps[0] is not None)
        counters = {c: getattr(self.engine, c) for c in COUNTERS if hasattr(self.engine, c)}
        loss_scale = ds_loss_scale.capture(self.engine)  # fp16 dynamic scale, hysteresis, overflow window
        self._refresh_layout()
        scheduler, n_old = self.engine.lr_scheduler, len(self.layout)
        self._release_engine()
        coordinator = Coordinator()
        with coordinator.shared_failure("engine rebuild (module surgery, client optimizer)"):
            for name, new in replacements.items():
                replace_module(module, name, new)
            del untouched
            gc.collect()
            named = dict(module.named_parameters())
            # A switch's factors go to companion groups (step 0); grown U, V keep their names, groups and steps.
            self.layout, origins = self.layout.rebase(layers, named, companions=new_group, lr_scale=lr_scale)
            group_steps = [None if steps[0] is None else torch.zeros_like(steps[0]) if o.fresh and not carry_steps
                           else steps[o.source].clone() for o in origins]
            maybe_fault("rebuild")
            client = rebuilt_optimizer(self.optimizer_factory, self.layout, named) if self.optimizer_factory else None
            rebind = None if scheduler is None else (lambda opt: rebind_scheduler(scheduler, opt, origins, n_old))
        self.engine, _ = self._initialize(module, client, rebind)
        with coordinator.shared_failure("optimizer transplant into the rebuilt engine"):
            for counter, value in counters.items():
                setattr(self.engine, counter, value)
            ds_loss_scale.restore(self.engine, loss_scale)
            maybe_fault("transplant")
            if steps[0] is not None:
                ds_state.create_state(self.engine, group_steps)
            new_named = dict(self.engine.module.named_parameters())
            ds_state.restore(self.stage, new_named, snapshot)
            ds_state.write_full(self.stage, new_named, values, states)
        # One full gc pass per switch (above, before the new engine allocates): a second one here cost
        # 0.15-0.25 s with torch + DeepSpeed loaded and freed only temporaries the next automatic pass gets.
        return {"params_before": params_before, "params_after": count_parameters(self.engine.module),
                "layers": len(replacements)}

    def _release_engine(self) -> None:
        """Destroy the engine and what `destroy()` leaves behind on the module we keep (ds_cleanup)."""
        engine, self.engine = self.engine, None
        release_engine(engine)
