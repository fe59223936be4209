"""The user's optimizer param groups, by parameter name: the one layout every rebuild and checkpoint uses.

A rebuild (switch, growth, resume) makes a new optimizer over new parameter objects, so groups cannot be
kept by identity. `GroupLayout` keeps them by name: per group its members and its hyper-parameters (lr as
the scheduler left it, weight_decay, betas, `initial_lr`, any key the user added), captured from the user's
optimizer (an instance, or what a factory returned). Every backend rebuilds from it, and the checkpoint
manifest stores it (`to_meta`), so a resumed run gets the same groups back.

Where a layer is replaced, each new parameter joins the group of the one it replaces: a new bias the old
bias's group, every other new parameter (the factors) the group of the layer's weight (InRank: of U, V, W0,
which must share one group). An ambiguous source is an error, never a silent move.

Engines that keep *one* Adam step per group (DeepSpeed ZeRO's flat groups) cannot give a factor step 0
inside a group that is at step t, so there the factors go into a *companion* group: a new group with the
source group's hyper-parameters (`companions=True`). `rebase` returns, for each new group, the old group it
continues, so per-group scheduler lists (base_lrs, lr_lambdas, ...) follow their group (`rebind_scheduler`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from dist_lowrank.errors import DistLowRankError

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
OptimizerSpec = Union[torch.optim.Optimizer, OptimizerFactory]
SchedulerSpec = Any  # an LR scheduler instance bound to the first optimizer, or a callable optimizer -> scheduler

# Scheduler attributes that are lists but not one entry per param group.
_NOT_PER_GROUP = {"_schedulers", "_milestones", "milestones"}


@dataclass
class ParamGroup:
    """One optimizer group: member parameter names (in order) and every non-`params` key."""

    names: list[str]
    hyper: dict[str, Any] = field(default_factory=dict)


@dataclass
class Origin:
    """Where a group of a rebased layout comes from: old group `source`; `fresh` for a companion group;
    `lr_scale`: the factor its lr (and the scheduler's per-group lr lists) carries relative to the source."""

    source: int
    fresh: bool = False
    lr_scale: float = 1.0


# Group keys and scheduler per-group lists that are learning rates, scaled for a companion with lr_scale != 1
# (torch LambdaLR/cosine keep base_lrs; OneCycleLR keeps max_lr/min_lr in the group; DeepSpeed's WarmupLR
# min_lrs/delta_lrs), so a scheduler keeps scaling the companion's lr after the switch.
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
_LR_LISTS = ("base_lrs", "_last_lr", "min_lrs", "max_lrs", "delta_lrs")


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


class GroupLayout:
    """The param groups of one optimizer, by parameter name (see the module docstring)."""

    def __init__(self, groups: list[ParamGroup]) -> None:
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __repr__(self) -> str:
        return f"GroupLayout({[(g.names, g.hyper) for g in self.groups]})"

    # -- capture and build -------------------------------------------------------------------------
    @classmethod
    def capture(cls, optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter]) -> "GroupLayout":
        """The layout of a live torch optimizer over the parameters in `named`."""
        by_id = {id(p): n for n, p in named.items()}
        groups = []
        for index, group in enumerate(optimizer.param_groups):
            names = []
            for param in group["params"]:
                if id(param) not in by_id:
                    raise DistLowRankError(f"optimizer: param group {index} holds a parameter of shape "
                                           f"{tuple(param.shape)} that is not one of the model's (was the optimizer "
                                           f"built over another model instance?)")
                names.append(by_id[id(param)])
            groups.append(ParamGroup(names, {k: _clone(v) for k, v in group.items() if k != "params"}))
        return cls(groups)

    @classmethod
    def single(cls, names: Iterable[str]) -> "GroupLayout":
        """One group of every named parameter, hyper-parameters left to the optimizer's defaults."""
        return cls([ParamGroup(list(names))])

    def refresh(self, param_groups: list[dict[str, Any]]) -> None:
        """Take the current hyper-parameters (lr as a scheduler set it, ...) from the live optimizer's groups,
        which are this layout's groups in the same order."""
        if len(param_groups) != len(self.groups):
            raise DistLowRankError(f"optimizer: has {len(param_groups)} param groups, the layout {len(self.groups)}")
        for group, live in zip(self.groups, param_groups):
            group.hyper = {k: _clone(v) for k, v in live.items() if k != "params"}

    def param_groups(self, named: dict[str, nn.Parameter]) -> list[dict[str, Any]]:
        """Constructor input for a torch optimizer: [{"params": [...], **hyper}, ...]."""
        out = []
        for index, group in enumerate(self.groups):
            missing = [n for n in group.names if n not in named]
            if missing:
                raise DistLowRankError(f"param groups: group {index} names {missing[:3]}, which the model does not have")
            out.append({"params": [named[n] for n in group.names], **{k: _clone(v) for k, v in group.hyper.items()}})
        return out

    def check(self, optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter]) -> None:
        """The optimizer holds exactly this layout's groups (a factory that ignores the params it is given
        would silently move or drop parameters)."""
        built = GroupLayout.capture(optimizer, named) if len(optimizer.param_groups) == len(self.groups) else None
        if built is None or [g.names for g in built.groups] != [g.names for g in self.groups]:
            raise DistLowRankError("optimizer_factory: the optimizer it built does not hold the param groups it was "
                                   "given (a factory must build its optimizer from its `params` argument)")

    # -- a layer replaced ---------------------------------------------------------------------------
    def rebase(self, layers: dict[str, list[str]], present: Iterable[str],
               companions: bool, lr_scale: float = 1.0) -> tuple["GroupLayout", list[Origin]]:
        """The layout after the layers in `layers` (layer name -> its old parameter names) were replaced;
        `present` are the rebuilt model's parameter names. A name kept keeps its group; a new name under a
        replaced layer joins its source's group (companions=False) or a companion group of it (True), whose
        learning rates (_LR_KEYS) are the source's × lr_scale; groups left empty are dropped. Returns the
        layout and, per new group, its origin."""
        if lr_scale != 1.0 and not companions:
            raise DistLowRankError(f"lr_scale: {lr_scale} needs the new factors in groups of their own (companions)")
        present = list(present)
        group_of = {n: i for i, g in enumerate(self.groups) for n in g.names}
        alive = set(present)
        arrivals: dict[int, list[str]] = {}
        for name in present:
            if name in group_of:
                continue
            layer = max((l for l in layers if name.startswith(l + ".")), key=len, default=None)
            if layer is None:
                continue  # not in the optimizer before, not a successor of anything in it: stays out
            source = self._source(name, layer, [o for o in layers[layer] if o in group_of], group_of)
            if source is not None:
                arrivals.setdefault(source, []).append(name)
        groups: list[ParamGroup] = []
        origins: list[Origin] = []
        for index, group in enumerate(self.groups):
            names = [n for n in group.names if n in alive]
            if not companions:
                names += arrivals.get(index, [])
            if names:
                groups.append(ParamGroup(names, dict(group.hyper)))
                origins.append(Origin(index))
        if companions:
            for index in sorted(arrivals):
                hyper = dict(self.groups[index].hyper)
                if lr_scale != 1.0:
                    hyper.update({k: _scaled(hyper[k], lr_scale) for k in _LR_KEYS if k in hyper})
                groups.append(ParamGroup(arrivals[index], hyper))
                origins.append(Origin(index, fresh=True, lr_scale=lr_scale))
        return GroupLayout(groups), origins

    @staticmethod
    def _source(name: str, layer: str, olds: list[str], group_of: dict[str, int]) -> Optional[int]:
        """The old group a new parameter of a replaced layer joins (None: the layer had nothing optimized)."""
        if not olds:
            return None
        if name.rsplit(".", 1)[-1] == "bias" and f"{layer}.bias" in group_of:
            return group_of[f"{layer}.bias"]
        weights = [o for o in olds if o != f"{layer}.bias"] or olds
        candidates = sorted({group_of[o] for o in weights})
        if len(candidates) != 1:
            raise DistLowRankError(f"param groups: {name} replaces {weights}, which sit in different param groups "
                                   f"{candidates}; put a layer's weights in one group")
        return candidates[0]

    def origins_in(self, user: "GroupLayout") -> list[Origin]:
        """For each group here, the one group of `user` that holds all its members (a saved layout read
        against the optimizer the user built on resume)."""
        where = {n: i for i, g in enumerate(user.groups) for n in g.names}
        origins = []
        for index, group in enumerate(self.groups):
            owners = sorted({where[n] for n in group.names if n in where})
            if len(owners) != 1:
                raise DistLowRankError(f"param groups: the checkpoint's group {index} ({group.names[:3]}...) lies in "
                                       f"groups {owners} of the optimizer passed now; group the parameters as before")
            origins.append(Origin(owners[0]))
        return origins

    # -- checkpoint manifest ----------------------------------------------------------------------
    def to_meta(self) -> list[dict[str, Any]]:
        """Plain JSON: [{"names": [...], "hyper": {...}}]; tuples become lists, scalar tensors floats."""
        return [{"names": list(g.names), "hyper": {k: _to_json(v, f"param group {i}: {k}") for k, v in g.hyper.items()}}
                for i, g in enumerate(self.groups)]

    @classmethod
    def from_meta(cls, meta: list[dict[str, Any]]) -> "GroupLayout":
        """Inverse of `to_meta` (lists come back as tuples: torch's hyper-parameters are tuples, never lists)."""
        return cls([ParamGroup(list(g["names"]), {k: _from_json(v) for k, v in g.get("hyper", {}).items()})
                    for g in meta])


def _to_json(value: Any, where: str) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise DistLowRankError(f"{where}: a tensor of shape {tuple(value.shape)} cannot go into the manifest")
        return float(value)
    if isinstance(value, (tuple, list)):
        return [_to_json(v, where) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise DistLowRankError(f"{where}: a value of type {type(value).__name__} cannot go into the checkpoint manifest "
                           f"(use numbers, strings, booleans or tuples of them)")


def _from_json(value: Any) -> Any:
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


# -- optimizer and scheduler recipes ---------------------------------------------------------------
def optimizer_recipe(spec: Optional[OptimizerSpec]) -> Optional[OptimizerFactory]:
    """How to build the optimizer again over new parameters: a factory is used as is (it receives the
    param-group dicts); an instance is re-created with its class and constructor defaults (per-group values
    come from the layout, state is transplanted by the backend)."""
    if spec is None:
        return None
    if isinstance(spec, torch.optim.Optimizer):
        cls = type(spec)
        accepted = inspect.signature(cls.__init__).parameters
        defaults = {k: v for k, v in spec.defaults.items() if k in accepted}
        return lambda groups: cls(groups, **defaults)
    if callable(spec):
        return spec
    raise TypeError("optimizer: expected a torch.optim.Optimizer, a callable params -> optimizer, or None")


def first_optimizer(spec: OptimizerSpec, named: dict[str, nn.Parameter], saved: Optional[GroupLayout] = None
                    ) -> tuple[torch.optim.Optimizer, GroupLayout, Optional[list[Origin]]]:
    """The first optimizer, its layout, and (resume with an instance) which of the user's groups each group
    continues. Fresh: the user's instance, or the factory's output over the model's parameters. With a
    `saved` layout (resume): built from it, so the groups (companions included) are the checkpoint's; a
    user's instance then says, by membership, which of its groups each saved group belongs to, so the
    user's scheduler can be re-bound (`bind_scheduler(..., origins=)`)."""
    if saved is None:
        optimizer = spec if isinstance(spec, torch.optim.Optimizer) else optimizer_recipe(spec)(list(named.values()))
        return optimizer, GroupLayout.capture(optimizer, named), None
    optimizer = optimizer_recipe(spec)(saved.param_groups(named))
    saved.check(optimizer, named)
    origins = saved.origins_in(GroupLayout.capture(spec, named)) if isinstance(spec, torch.optim.Optimizer) else None
    return optimizer, GroupLayout.capture(optimizer, named), origins


def rebuilt_optimizer(recipe: OptimizerFactory, layout: GroupLayout,
                      named: dict[str, nn.Parameter]) -> torch.optim.Optimizer:
    """A new optimizer over `named` with exactly `layout`'s groups and hyper-parameters."""
    optimizer = recipe(layout.param_groups(named))
    layout.check(optimizer, named)
    return optimizer


def is_scheduler_instance(spec: SchedulerSpec) -> bool:
    """An LR scheduler object (torch's or DeepSpeed's), as opposed to a factory optimizer -> scheduler."""
    return spec is not None and not callable(spec) and hasattr(spec, "step") and hasattr(spec, "state_dict")


def bind_scheduler(spec: SchedulerSpec, optimizer: torch.optim.Optimizer, given: Any = None,
                   origins: Optional[list[Origin]] = None) -> Any:
    """The scheduler for the first optimizer: a factory is called; an instance must drive the user's
    optimizer `given` (or `optimizer` itself). When the backend built another optimizer (resume from a saved
    layout) the instance is re-bound to it, group i continuing the user's group origins[i]."""
    if spec is None:
        return None
    if not is_scheduler_instance(spec):
        return spec(optimizer)
    bound = getattr(spec, "optimizer", None)
    if bound is not optimizer and (given is None or bound is not given):
        raise DistLowRankError("lr_scheduler: the instance drives another optimizer than the one passed as "
                               "`optimizer` (build the scheduler on that optimizer, or pass a factory)")
    if bound is not optimizer:
        rebind_scheduler(spec, optimizer, origins or [Origin(i) for i in range(len(optimizer.param_groups))])
    return spec


def rebind_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, origins: list[Origin],
                     n_old: Optional[int] = None) -> Any:
    """Point `scheduler` (and the schedulers it chains) at `optimizer` without moving its position
    (last_epoch, step count): every per-group list (base_lrs, _last_lr, lr_lambdas, min_lrs, ...) of the
    `n_old` old groups (default: the optimizer it drove so far) is remapped so that new group i continues old
    group origins[i].source (a companion takes its source's schedule)."""
    if n_old is None:
        n_old = len(scheduler.optimizer.param_groups)
    _remap(scheduler, optimizer, origins, n_old)
    return scheduler


def _scaled(value: Any, scale: float) -> Any:
    """A learning rate (number or scalar tensor) times `scale`; anything else as it is."""
    return value * scale if isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool) else value


def _remap(scheduler: Any, optimizer: torch.optim.Optimizer, origins: list[Origin], n_old: int) -> None:
    for child in getattr(scheduler, "_schedulers", None) or ():
        _remap(child, optimizer, origins, n_old)
    for key, value in list(vars(scheduler).items()):
        if key not in _NOT_PER_GROUP and isinstance(value, list) and len(value) == n_old and n_old:
            if key in _LR_LISTS:
                setattr(scheduler, key, [_scaled(value[o.source], o.lr_scale) if o.lr_scale != 1.0 else value[o.source]
                                         for o in origins])
            else:
                setattr(scheduler, key, [value[o.source] for o in origins])
    if hasattr(scheduler, "optimizer"):
        scheduler.optimizer = optimizer
