"""DeepSpeed ZeRO stages 1, 2 and 3: change layer shapes by rebuilding the engine, keeping state.

Neither DeepSpeed nor torch supports changing a parameter's shape in place, so a switch is:
1. per targeted layer (one at a time, every rank taking part), the full fp32 master weight via
   `safe_get_full_fp32_param`; the layer's owner rank runs the SVD and broadcasts the factors;
2. a snapshot of every untouched parameter's fp32 master and Adam moments — ZeRO-3: this rank's own
   partition (`safe_get_local_*`, no communication; partitions of an untouched parameter are the
   same in the new engine), ZeRO-1/2: the full tensors (`safe_get_full_*`; the flat partitions are
   laid out anew, so local fragments do not map) — plus the engine's step counters and scheduler;
3. the old engine is destroyed (its hooks, ZeRO-3's per-module backward Functions and ZeRO-3's
   class-level param-release memo removed, so nothing keeps it or the replaced parameters alive); factorized modules replace the layers in
   the same module (ZeRO-3 converts the new parameters to partitioned ones like the others);
4. a new `deepspeed.initialize` with a new client optimizer built from the user's param-group layout
   (`param_groups.GroupLayout`, by name, hyper-parameters as the scheduler left them). ZeRO keeps one Adam
   step counter per flat group, so the new factors of each source group go into a *companion* group with
   the source's hyper-parameters, appended at the end: they start at step 0 with zero moments, like
   torch's per-parameter Adam, while every other group keeps its step. The scheduler instance is re-bound
   to the new optimizer at its position; companions take their source group's schedule (base_lr,
   lr_lambda). The snapshot is written back bit for bit.
Local stretches (module surgery + client optimizer; state write-back) end in `Coordinator.shared_failure`,
so one rank's failure there ends every rank with the same named error; a failure *inside* one of
DeepSpeed's own collectives (gathers, `deepspeed.initialize`) is left to the process-group timeout.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from dist_lowrank.backends import ds_loss_scale
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

MOMENTS = ("exp_avg", "exp_avg_sq")
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
        self.engine.backward(loss)

    def step(self) -> None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            self.link_optimizer_state_once()

    def link_optimizer_state_once(self) -> None:
        """After the first optimizer step of an engine: link ZeRO-1/2's per-parameter state fragments for every
        group (see `_relink_optimizer_state`), so `safe_get_full_optimizer_state` works on all of them."""
        if not getattr(self.engine, "_dist_lowrank_linked", False) and self._group_steps()[0] is not None:
            self._relink_optimizer_state()
            self.engine._dist_lowrank_linked = True  # a mark on the engine: no reference that outlives it

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that holds the flat fp32 partitions' state."""
        opt = self.engine.optimizer
        return getattr(opt, "optimizer", opt)

    # -- checkpoints: DeepSpeed's own format (engine.save_checkpoint / load_checkpoint) --------------
    CHECKPOINT_TAG = "engine"
    UNIVERSAL_DIR = "universal"

    def engine_meta(self) -> dict[str, Any]:
        steps = [None if step is None else float(step) for step in self._group_steps()]
        self._refresh_layout()
        return {"group_names": self.group_names, "param_groups": self.layout.to_meta(), "zero_stage": self.stage,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1, "group_steps": steps}

    def _refresh_layout(self) -> None:
        """The layout's hyper-parameters from the client optimizer's groups (lr as the scheduler set it)."""
        if self.optimizer_factory is not None:
            self.layout.refresh([{k: v for k, v in g.items() if k != "params"}
                                 for g in self._base_optimizer().param_groups])

    def save_state(self, directory: Path, manifest_json: str) -> None:
        """Native checkpoint; the module carries DeepSpeed's universal-checkpoint marker so that
        ds_to_universal can convert it for another world size."""
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        if getattr(self.engine.module, UNIVERSAL_CHECKPOINT_INFO, None) is None:
            setattr(self.engine.module, UNIVERSAL_CHECKPOINT_INFO,
                    {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
        self.engine.save_checkpoint(str(directory), tag=self.CHECKPOINT_TAG,
                                    client_state={"dist_lowrank_manifest": manifest_json}, save_latest=False)

    @staticmethod
    def needs_universal(engine_meta: Optional[dict[str, Any]]) -> bool:
        """A checkpoint from another world size loads through DeepSpeed's universal checkpoint (the engine
        must be built with `checkpoint.load_universal`)."""
        saved = (engine_meta or {}).get("world_size")
        return saved is not None and saved != (dist.get_world_size() if dist.is_initialized() else 1)

    def load_state(self, directory: Path, engine_meta: Optional[dict[str, Any]] = None) -> None:
        saved_stage = (engine_meta or {}).get("zero_stage", self.stage)
        if saved_stage != self.stage:
            raise CheckpointError(f"{directory}: saved with ZeRO stage {saved_stage}, this engine is stage "
                                  f"{self.stage}; resume with run.zero_stage={saved_stage}")
        source = Path(directory)
        if self.needs_universal(engine_meta):
            if not self.engine.load_universal_checkpoint():
                raise CheckpointError(f"{directory}: saved on {engine_meta['world_size']} ranks; build the engine "
                                      f"with checkpoint.load_universal to load it here")
            source = _universal_copy(source, self.CHECKPOINT_TAG, self.UNIVERSAL_DIR)
        try:
            path, _ = self.engine.load_checkpoint(str(source), tag=self.CHECKPOINT_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        except (RuntimeError, AssertionError, ValueError) as exc:  # e.g. size mismatch naming the parameter
            raise CheckpointError(f"{source}: {str(exc).splitlines()[0][:300]}") from exc
        if path is None:
            raise CheckpointError(f"{source}/{self.CHECKPOINT_TAG}: DeepSpeed found no checkpoint to load")
        if self._group_steps()[0] is not None:
            self._relink_optimizer_state()  # ZeRO-1/2 leave the fragment links of loaded state unset
        if source != Path(directory):
            self._restore_group_steps((engine_meta or {}).get("group_steps") or [])

    def _restore_group_steps(self, steps: list[Optional[float]]) -> None:
        """Each param group's own Adam step after a universal load. DeepSpeed 0.19.8's ZeRO-3 universal
        loader gives every sub-group the step of the first one; factors added at a switch count their own
        (smaller) step, and Adam's bias correction depends on it."""
        base = self._base_optimizer()
        for index, flat in self._flat_partitions():
            state = base.state.get(flat)
            if state and "step" in state and index < len(steps) and steps[index] is not None:
                old = state["step"]
                state["step"] = torch.full_like(old, steps[index]) if isinstance(old, torch.Tensor) else steps[index]

    def export_fp32(self) -> Optional[dict[str, torch.Tensor]]:
        """fp32 masters of every parameter (collective under ZeRO-3) plus buffers, on rank 0."""
        module = self.engine.module
        out = {name: _full_fp32(param) for name, param in module.named_parameters()}
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
        return _full_fp32(param)

    def values_dtype(self, param: torch.Tensor) -> torch.dtype:
        return torch.float32  # the optimizer's masters: what `gather` returns and what the new engine is given

    def full_state(self, param: torch.Tensor) -> Optional[dict[str, Any]]:
        """Full Adam moments of one parameter (`safe_get_full_optimizer_state`: an all-reduce of the fragments on
        ZeRO-1/2, a gather on ZeRO-3); None before the first step or for a frozen parameter. The step is the
        param group's (ZeRO keeps one per flat group), so it is not part of a parameter's state here."""
        from deepspeed.utils import safe_get_full_optimizer_state

        if not param.requires_grad or self._group_steps()[0] is None:
            return None
        marker = (id(self.engine), getattr(self.engine, "global_steps", None))
        if getattr(self, "_linked_at", None) != marker:
            self._relink_optimizer_state()
            self._linked_at = marker
        return {k: safe_get_full_optimizer_state(param, k).detach().float().cpu() for k in MOMENTS}

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
        snapshot = self._snapshot(untouched)
        counters = {c: getattr(self.engine, c) for c in COUNTERS if hasattr(self.engine, c)}
        loss_scale = ds_loss_scale.capture(self.engine)  # fp16 dynamic scale, hysteresis, overflow window
        steps = self._group_steps()
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
                self._create_optimizer_state(group_steps)
            new_named = dict(self.engine.module.named_parameters())
            self._restore(new_named, snapshot)
            self._write_full(new_named, values, states)
        # One full gc pass per switch (above, before the new engine allocates): a second one here cost
        # 0.15-0.25 s with torch + DeepSpeed loaded and freed only temporaries the next automatic pass gets.
        return {"params_before": params_before, "params_after": count_parameters(self.engine.module),
                "layers": len(replacements)}

    def _release_engine(self) -> None:
        """Destroy the engine and what `destroy()` leaves behind on the module we keep (ds_cleanup)."""
        engine, self.engine = self.engine, None
        release_engine(engine)

    def _flat_partitions(self) -> list[tuple[int, torch.Tensor]]:
        """(client param group index, flat fp32 partition) pairs whose state the torch optimizer holds.
        ZeRO-3 keeps its sub-group partitions outside `param_groups` between steps."""
        zero = self.engine.optimizer
        if hasattr(zero, "fp32_partitioned_groups_flat"):
            return [(zero.sub_group_to_group_id[i], flat) for i, flat in enumerate(zero.fp32_partitioned_groups_flat)]
        return [(i, flat) for i, group in enumerate(self._base_optimizer().param_groups) for flat in group["params"]]

    def _group_steps(self) -> list[Optional[torch.Tensor]]:
        """Adam's step per client param group (None before the first optimizer step)."""
        base = self._base_optimizer()
        steps: list[Optional[torch.Tensor]] = [None] * len(base.param_groups)
        for index, flat in self._flat_partitions():
            if steps[index] is None and "step" in base.state.get(flat, {}):
                raw = base.state[flat]["step"]
                steps[index] = raw.clone() if isinstance(raw, torch.Tensor) else torch.tensor(float(raw))
        return steps

    def _snapshot(self, params: dict[str, nn.Parameter]) -> dict[str, dict[str, torch.Tensor]]:
        from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                                     safe_get_local_fp32_param, safe_get_local_optimizer_state)

        has_state = self._group_steps()[0] is not None
        if has_state:
            self._relink_optimizer_state()
        out = {}
        for name, param in params.items():
            if not param.requires_grad:  # frozen (e.g. InRank W0): no master, no moments; the module keeps it
                continue
            if self.stage == 3:
                entry = {"fp32": safe_get_local_fp32_param(param).clone()}
                if has_state:
                    entry.update({k: safe_get_local_optimizer_state(param, k).clone() for k in MOMENTS})
            else:
                entry = {"fp32": safe_get_full_fp32_param(param).clone()}
                if has_state:
                    entry.update({k: safe_get_full_optimizer_state(param, k).clone() for k in MOMENTS})
            out[name] = entry
        return out

    def _relink_optimizer_state(self) -> None:
        """ZeRO-1/2 link each parameter's optimizer-state fragments once, right after the *first group's*
        first step (DeepSpeed 0.19.8 `_optimizer_step(group_no)`): groups after the first have no Adam state
        yet then, so their fragments stay empty ("exp_avg not found in optimizer state fragment"); after
        load_checkpoint they are not linked at all. Link again now that every group has state (local narrow()
        views, no communication)."""
        zero = self.engine.optimizer
        if hasattr(zero, "_hp_optimizer_states_linked") and hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _create_optimizer_state(self, steps: list[torch.Tensor]) -> None:
        """Adam state for the new flat partitions (zero moments, each group's step), then the fragment
        links (ZeRO-1/2 link optimizer-state fragments lazily, after the first step)."""
        base = self._base_optimizer()
        for index, flat in self._flat_partitions():
            if not base.state.get(flat):
                base.state[flat] = {"step": steps[index].clone(), **{k: torch.zeros_like(flat) for k in MOMENTS}}
        link = getattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            link()

    def _restore(self, params: dict[str, nn.Parameter], snapshot: dict[str, dict[str, torch.Tensor]]) -> None:
        from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state, safe_set_local_fp32_param,
                                     safe_set_local_optimizer_state)

        for name, entry in snapshot.items():
            param = params[name]
            if self.stage == 3:
                safe_set_local_fp32_param(param, entry["fp32"])
                for key in MOMENTS:
                    if key in entry:
                        safe_set_local_optimizer_state(param, entry[key], key)
            else:
                safe_set_full_fp32_param(param, entry["fp32"])
                for key in MOMENTS:
                    if key in entry:
                        safe_set_full_optimizer_state(param, entry[key], key)

    def _write_full(self, params: dict[str, nn.Parameter], values: dict[str, torch.Tensor],
                    states: dict[str, dict[str, torch.Tensor]]) -> None:
        """fp32 masters (and moments) of changed parameters from full tensors: ZeRO-3 writes this rank's
        partition, ZeRO-0/1/2 the full tensor (DeepSpeed keeps the fragments)."""
        from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state, safe_set_local_fp32_param,
                                     safe_set_local_optimizer_state)

        for pname, value in values.items():
            param = params[pname]
            shape = tuple(getattr(param, "ds_shape", param.shape))
            entries = {None: value, **states.get(pname, {})}
            for key, full in entries.items():
                full = full.reshape(shape).float()
                if self.stage == 3:
                    part = param.ds_tensor.numel()
                    flat = torch.zeros(part * dist.get_world_size(), dtype=torch.float32)
                    flat[: full.numel()] = full.reshape(-1)
                    local = flat[dist.get_rank() * part:(dist.get_rank() + 1) * part].to(param.ds_tensor.device)
                    if key is None:
                        safe_set_local_fp32_param(param, local)
                    else:
                        safe_set_local_optimizer_state(param, local, key)
                elif key is None:
                    safe_set_full_fp32_param(param, full.to(param.device))
                else:
                    safe_set_full_optimizer_state(param, full.to(param.device), key)

def _universal_copy(directory: Path, tag: str, name: str) -> Path:
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


def _full_fp32(param: torch.Tensor) -> torch.Tensor:
    """The full fp32 value of a parameter (collective under ZeRO-3): the optimizer's master copy, or for
    a frozen parameter (no master, e.g. InRank's W0) the gathered module parameter."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param) if param.requires_grad else None
    if value is None:
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            value = param.detach().clone()
    return value.detach().float().cpu()
