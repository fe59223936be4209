"""One process, no wrapper: the reference every distributed backend is compared with."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from dist_lowrank.backends.optim_state import snapshot_state, transplant_state
from dist_lowrank.backends.base import Backend
from dist_lowrank.layers import weight_matrix
from dist_lowrank.plan import Plan
from dist_lowrank.reshard import factorize_spread
from dist_lowrank.shard_view import ShardView
from dist_lowrank.surgery import apply_rank_plan, count_parameters


class LocalBackend(Backend):
    """Plain module + torch optimizer in a single process; reshards by module surgery."""

    name = "local"

    def __init__(self, model: nn.Module, optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]):
        self.model = model
        self.optimizer_factory = optimizer_factory
        self.optimizer = optimizer_factory(model.parameters())

    def shard_views(self, names: list[str]) -> list[ShardView]:
        modules = dict(self.model.named_modules())
        views = []
        for name in names:
            matrix = weight_matrix(modules[name]).detach()
            views.append(ShardView(name, tuple(matrix.shape), 0, matrix.reshape(-1), replicated=True))
        return views

    def execute(self, plan: Plan) -> dict[str, Any]:
        start = time.perf_counter()
        params_before = count_parameters(self.model)
        modules = dict(self.model.named_modules())
        names = sorted(plan.ranks)
        factors = factorize_spread(names, plan.ranks, lambda n: weight_matrix(modules[n]).detach(),
                                   dtype=modules[names[0]].weight.dtype)
        changed = {f"{n}.weight" for n in names} | {f"{n}.bias" for n in names}
        untouched = {n: p for n, p in self.model.named_parameters() if n not in changed}
        snapshot = snapshot_state(self.optimizer, untouched)
        report = apply_rank_plan(self.model, plan.ranks, factors)
        self.optimizer = self.optimizer_factory(self.model.parameters())
        named = dict(self.model.named_parameters())
        new_names = [n for n in named if n not in untouched]
        transplant_state(self.optimizer, named, snapshot, new_names)
        return {"seconds": time.perf_counter() - start, "params_before": params_before,
                "params_after": report.params_after, "layers": len(names)}
