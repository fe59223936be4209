"""One process, no wrapper: the reference every distributed backend is compared with.

Also the base of the DDP backend: with replicated weights a reshard is module surgery on every rank
(factors computed once, by the layer's owner rank, and broadcast) plus a new optimizer that takes
over the state of every untouched parameter.
"""
from __future__ import annotations

import gc
import resource
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from dist_lowrank.backends.base import Backend
from dist_lowrank.backends.optim_state import (embed_state, group_hyperparams, install_states, rebuild_optimizer,
                                               restore_group_hyperparams, snapshot_state, transplant_state)
from dist_lowrank.backends.param_groups import (GroupLayout, OptimizerSpec, SchedulerSpec, bind_scheduler,
                                                first_optimizer, optimizer_recipe)
from dist_lowrank.coordinator import Coordinator
from dist_lowrank.device import comm_device
from dist_lowrank.errors import CheckpointError
from dist_lowrank.faults import maybe_fault
from dist_lowrank.plan import Plan
from dist_lowrank.reshard import factorize_spread, layer_fetcher, projected_factor_states
from dist_lowrank.shard_view import ShardView, replicated_view
from dist_lowrank.surgery import apply_rank_plan, count_parameters, replace_module

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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

    def execute(self, plan: Plan) -> dict[str, Any]:
        """Factorize plan.ranks (owner-rank SVDs, broadcast), rebuild wrapper and optimizer, keep state.
        New factors start as plan.factor_moments says (optim_state's docstring); lr_scale != 1 puts them in
        companion groups with the scaled lr (the optimizer keeps a step per parameter, so no other reason)."""
        if plan.kind == "grow":
            return self._grow(plan)
        start = time.perf_counter()
        rss_before = peak_rss_mb()
        params_before = count_parameters(self.module)
        modules = dict(self.module.named_modules())
        names = sorted(plan.ranks)
        reference = next(modules[names[0]].parameters())
        factors = factorize_spread(names, plan.ranks, layer_fetcher(modules, lambda p: p.detach(), {}),
                                   dtype=reference.dtype, device=comm_device())
        factors = {n: (a.to(reference.device), b.to(reference.device)) for n, (a, b) in factors.items()}
        layers = {n: [f"{n}.{leaf}" for leaf, _ in modules[n].named_parameters()] for n in names}
        changed = {p for olds in layers.values() for p in olds}
        # Local work only from here to the wrap (DDP broadcasts there): a failure on any rank is shared first.
        with Coordinator().shared_failure("switch rebuild (module surgery, optimizer transplant)"):
            untouched = {n: p for n, p in self.module.named_parameters() if n not in changed}
            snapshot = snapshot_state(self.optimizer, untouched)
            optimizer = self.optimizer
            projected = (projected_factor_states(names, modules, factors, lambda _n, p: optimizer.state.get(p))
                         if plan.factor_moments == "projected" else {})
            del optimizer
            self.layout.refresh(self.optimizer.param_groups)
            scheduler = self.scheduler
            self.release()
            report = apply_rank_plan(self.module, plan.ranks, factors)
            del modules, factors
            maybe_fault("rebuild")
            named = dict(self.module.named_parameters())
            companions = plan.lr_scale != 1.0
            self.layout, origins = self.layout.rebase(layers, named, companions=companions, lr_scale=plan.lr_scale)
            self.optimizer = rebuild_optimizer(self.optimizer_factory, self.layout, named, snapshot, scheduler,
                                               origins if companions else None)
            install_states(self.optimizer, named, projected)
            self.scheduler = scheduler
        self.model = self.wrap(self.module)
        gc.collect()
        return {"seconds": time.perf_counter() - start, "params_before": params_before,
                "params_after": report.params_after, "layers": len(names),
                "peak_rss_mb": peak_rss_mb(), "peak_rss_growth_mb": peak_rss_mb() - rss_before}

    def _grow(self, plan: Plan) -> dict[str, Any]:
        """InRank layers outgrew their capacity: bigger U, V (old block kept, new U columns zero so the
        function is unchanged), old moments embedded, new rows/columns with zero moments."""
        start = time.perf_counter()
        modules = dict(self.module.named_modules())
        grown = sorted(plan.capacities)
        changed = {f"{n}.{p}" for n in grown for p in ("u", "v")}
        with Coordinator().shared_failure("growth rebuild (module surgery, optimizer transplant)"):
            named = dict(self.module.named_parameters())
            snapshot = snapshot_state(self.optimizer, named)
            self.layout.refresh(self.optimizer.param_groups)
            scheduler = self.scheduler
            self.release()
            for name in grown:
                new = modules[name].with_capacity(plan.capacities[name])
                new.grow(plan.ranks[name])
                replace_module(self.module, name, new)
            del modules
            maybe_fault("rebuild")
            new_named = dict(self.module.named_parameters())
            for name in changed & set(snapshot):
                snapshot[name] = embed_state(snapshot[name], new_named[name].shape)
            # U, V keep their names, so the layout (groups, hyper-parameters) is unchanged
            self.optimizer = rebuild_optimizer(self.optimizer_factory, self.layout, new_named, snapshot, scheduler)
            self.scheduler = scheduler
        self.model = self.wrap(self.module)
        gc.collect()
        return {"seconds": time.perf_counter() - start, "layers": len(grown), "peak_rss_mb": peak_rss_mb()}

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
