"""fairscale OSS + ShardedDataParallel: weights replicated, optimizer state sharded by parameter.

`fairscale.optim.OSS` gives each parameter one owner rank (a greedy partition over the param groups, in order: the
next parameter goes to the rank with the fewest elements so far); only the owner keeps its state (in `oss.optim`,
the wrapped torch optimizer over that rank's share) and updates it, then broadcasts it. `ShardedDataParallel`
reduces each gradient to its owner during backward (non-owners end with `.grad = None`).

A reshard is surgery on every rank (the replicated module, as for DDP) plus a new OSS and a new ShardedDDP. The new
partition differs from the old one (the factors join the groups, the replaced weights leave them), so an untouched
parameter may change owner: its state is moved from the old owner to the new one, bit for bit, with one
point-to-point message per (old owner, new owner, dtype) pair after one small all-gather that says what each state
holds. Apart from that and the new wrapper's start-up broadcast of the module (as DDP does), nothing is
communicated; no rank holds more state than its own share plus what it receives.

Checkpoints are sharded the same way: every rank writes the states it owns by parameter name
(`fairscale_optim_rank<r>.pt`), rank 0 the module, group hyper-parameters and scheduler (`state.pt`). A loader takes,
from every shard file, the states of the parameters it owns under its own partition, so any world size loads them.

Gradient buckets (`reduce_buffer_size > 0`): ShardedDDP makes each bucketed `.grad` a view of its bucket, and
`optimizer.zero_grad(set_to_none=True)` breaks those views (the next backward allocates fresh gradients; the bucket
reduces stale zeros). Measured here (CPU, 2 gloo ranks, 6 steps): buckets + optimizer.zero_grad give other losses
than no buckets; buckets + ShardedDDP's own `zero_grad` give the same losses; so that is the likely cause of the
wrong losses DESIGN.md §3 reports. `step` clears gradients with ShardedDDP's `zero_grad`; the default is still
`reduce_buffer_size=0` on CPU (DESIGN.md §3) and fairscale's own elsewhere.

fairscale internals this file touches (fairscale 0.4.13; none has a public equivalent):
- `OSS._optim_constructor`, `OSS._optim_defaults`: the wrapped optimizer class and its keyword arguments, to build
  the OSS again over the rebuilt model's parameters;
- `OSS.optim`: the wrapped optimizer that holds this rank's states (documented as an attribute, read and written);
- `ShardedDataParallel._grad_hooks` / `._grad_accs` / `._manual_reduce`: the old wrapper's hooks on the
  AccumulateGrad nodes that the untouched parameters share with the new wrapper. They are removed at a rebuild
  rather than left to the garbage collector (wrapper, hooks and nodes form a cycle). Measured: a surviving old hook
  stays inert while the old wrapper's forward is not called again (its per-step flags stay cleared), so this is
  hygiene, not a fix: a stale user reference that ran the old wrapper would re-arm them and reduce every gradient
  a second time, to the old owners;
- `ShardedDataParallel._buffer_max_size`, `._use_buckets`, `._enable_broadcast_buffers`, `._auto_refresh_trainable`,
  `._reduce_fp16`, `._warn_on_trainable_params_changed`, `._process_group`: a user's wrapper's settings, carried to
  the rebuilt one.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from dist_lowrank.backends.local_backend import LocalBackend, load_module_state
from dist_lowrank.backends.optim_state import group_hyperparams, restore_group_hyperparams
from dist_lowrank.backends.param_groups import (GroupLayout, Origin, SchedulerSpec, bind_scheduler, rebind_scheduler,
                                                rebuilt_optimizer)
from dist_lowrank.coordinator import Coordinator
from dist_lowrank.device import comm_device, default_device, is_distributed
from dist_lowrank.errors import CheckpointError, DistLowRankError
from dist_lowrank.faults import maybe_fault
from dist_lowrank.reshape.change import ShapeChange

OSSFactory = Callable[[list[Any]], Any]  # param groups (or a list of parameters) -> fairscale.optim.OSS

_SDP_SETTINGS = {"reduce_buffer_size": "_buffer_max_size", "broadcast_buffers": "_enable_broadcast_buffers",
                 "auto_refresh_trainable": "_auto_refresh_trainable", "reduce_fp16": "_reduce_fp16",
                 "warn_on_trainable_params_changed": "_warn_on_trainable_params_changed"}
_SCALAR = "scalar"  # a state entry carried in the descriptor itself (a CPU 0-dim step tensor, a number)
_FLAT = "flat"  # a state entry sent as part of a flat buffer


def oss_recipe(oss: Any) -> OSSFactory:
    """How to build `oss` again over other parameters: the same class, wrapped optimizer, process group and options
    (per-group values come from the layout)."""
    cls, inner, defaults = type(oss), oss._optim_constructor, dict(oss._optim_defaults)
    options = {"group": oss.group, "broadcast_fp16": oss.broadcast_fp16,
               "force_broadcast_object": oss.force_broadcast_object}
    return lambda groups: cls(groups, optim=inner, **options, **defaults)


def oss_factory_from(factory: Callable[[Any], torch.optim.Optimizer]) -> OSSFactory:
    """A torch optimizer factory (params or param groups -> e.g. AdamW, as the CLI's recipe builds) as an OSS
    factory: the optimizer it returns (no state yet) gives the class, the groups with their hyper-parameters and
    the constructor defaults, and an OSS wraps that class over the same groups."""
    def build(params: Any) -> Any:
        from fairscale.optim import OSS

        probe = factory(params)
        cls = type(probe)
        accepted = inspect.signature(cls.__init__).parameters
        defaults = {k: v for k, v in probe.defaults.items() if k in accepted}
        return OSS([dict(group) for group in probe.param_groups], optim=cls, **defaults)
    return build


class FairscaleBackend(LocalBackend):
    """The user's module (or their ShardedDataParallel over it) with an OSS optimizer; the module stays at
    `self.module`, the wrapper at `self.model`, the OSS at `self.optimizer`."""

    name = "fairscale"
    shards_optimizer_state = True

    def __init__(self, model: nn.Module, optimizer: Union[Any, OSSFactory], scheduler: Optional[SchedulerSpec] = None,
                 sdp_kwargs: Optional[dict[str, Any]] = None,
                 param_groups: Optional[list[dict[str, Any]]] = None) -> None:
        """model: the module, or a `ShardedDataParallel` over it built with `optimizer` (its settings are kept for
        every rebuild); optimizer: an `OSS` over the module's parameters (its groups are kept), or a factory
        params -> OSS; scheduler: a scheduler instance driving that OSS, or a factory optimizer -> scheduler.
        sdp_kwargs: ShardedDataParallel keywords when `model` is a plain module (default reduce_buffer_size: 0 on
        CPU, fairscale's default elsewhere). param_groups: a checkpoint's saved layout (`engine_meta()`)."""
        from fairscale.nn.data_parallel import ShardedDataParallel
        from fairscale.optim import OSS

        given_sdp = model if isinstance(model, ShardedDataParallel) else None
        module = given_sdp.module if given_sdp is not None else model
        if given_sdp is not None and sdp_kwargs:
            raise DistLowRankError("sdp_kwargs: the model is a ShardedDataParallel already; its settings are used")
        self.sdp_kwargs = _sdp_settings(given_sdp) if given_sdp is not None else dict(sdp_kwargs or {})
        if isinstance(optimizer, OSS):
            self.optimizer_factory = oss_recipe(optimizer)
        elif callable(optimizer):
            self.optimizer_factory = optimizer
        else:
            raise DistLowRankError(f"optimizer: expected a fairscale.optim.OSS or a callable params -> OSS, got "
                                   f"{type(optimizer).__name__}")
        self.module = module if given_sdp is not None else module.to(default_device())
        named = dict(self.module.named_parameters())
        saved = GroupLayout.from_meta(param_groups) if param_groups else None
        origins: Optional[list[Origin]] = None
        if saved is not None:  # resume: the checkpoint's groups, built with the user's recipe
            self.optimizer = rebuilt_optimizer(self.optimizer_factory, saved, named)
            if isinstance(optimizer, OSS):
                origins = saved.origins_in(GroupLayout.capture(optimizer, named))
        elif isinstance(optimizer, OSS):
            self.optimizer = optimizer
        else:
            self.optimizer = optimizer(list(named.values()))
        if not isinstance(self.optimizer, OSS):
            raise DistLowRankError(f"optimizer: the factory returned a {type(self.optimizer).__name__}, not a "
                                   f"fairscale.optim.OSS (wrap your optimizer: OSS(params, optim=torch.optim.AdamW, ...))")
        self.layout = GroupLayout.capture(self.optimizer, named)
        given = optimizer if isinstance(optimizer, OSS) else None
        self.scheduler = bind_scheduler(scheduler, self.optimizer, given, origins)
        if given_sdp is not None and self.optimizer is optimizer:
            self.model = given_sdp
        else:  # a new OSS (resume): the user's wrapper reduces to the old partition, so it is replaced
            if given_sdp is not None:
                _remove_hooks(given_sdp)
            self.model = self.wrap(self.module)

    def wrap(self, module: nn.Module) -> nn.Module:
        """ShardedDataParallel over `module`, reducing each gradient to its owner in `self.optimizer`."""
        from fairscale.nn.data_parallel import ShardedDataParallel

        kwargs = dict(self.sdp_kwargs)
        if all(p.device.type == "cpu" for p in module.parameters()):
            kwargs.setdefault("reduce_buffer_size", 0)
        return ShardedDataParallel(module, self.optimizer, **kwargs)

    # -- ownership -------------------------------------------------------------------------------------
    @property
    def _group(self) -> Any:
        return self.optimizer.group

    def _rank(self) -> int:
        return dist.get_rank(self._group) if is_distributed() else 0

    def _owner_by_id(self) -> dict[int, int]:
        """{id(parameter): the rank of the OSS group that owns its state} (from OSS's public partition)."""
        return {id(p): rank for rank, groups in enumerate(self.optimizer.partition_parameters())
                for group in groups for p in group["params"]}

    def owners(self) -> dict[str, int]:
        """{parameter name: the rank of the OSS group that owns its state}."""
        rank_of = self._owner_by_id()
        return {n: rank_of[id(p)] for n, p in self.module.named_parameters() if id(p) in rank_of}

    @property
    def held_states(self) -> dict:
        """The states this rank owns: OSS keeps them in its wrapped optimizer (`OSS.optim`)."""
        return self.optimizer.optim.state

    def local_states(self) -> dict[str, dict[str, Any]]:
        """{name: state} of the parameters this rank owns (the states themselves, not copies)."""
        held = self.held_states
        return {n: held[p] for n, p in self.module.named_parameters() if held.get(p)}

    # -- primitives of the reshape pipeline ------------------------------------------------------------
    def full_state(self, param: torch.Tensor) -> Optional[dict[str, Any]]:
        """The parameter's state on every rank, broadcast by its owner (collective: every rank calls it)."""
        rank_of = self._owner_by_id()
        if id(param) not in rank_of:
            return None
        owner, me = rank_of[id(param)], self._rank()
        state = self.held_states.get(param) if owner == me else None
        desc = [_describe(state) if state else None]
        if is_distributed():
            dist.broadcast_object_list(desc, src=_global(self._group, owner), group=self._group)
        if desc[0] is None:
            return None
        out: dict[str, Any] = {}
        for key, (kind, spec) in sorted(desc[0].items()):
            if kind == _SCALAR:
                out[key] = spec.clone() if isinstance(spec, torch.Tensor) else spec
                continue
            shape, dtype, on_cpu = spec
            buf = (state[key].detach().to(comm_device()).clone() if owner == me
                   else torch.empty(shape, dtype=dtype, device=comm_device()))
            if is_distributed():
                dist.broadcast(buf, src=_global(self._group, owner), group=self._group)
            out[key] = buf.to("cpu" if on_cpu else param.device)
        return out

    def rebuild(self, change: ShapeChange, modules: dict[str, nn.Module], values: dict[str, torch.Tensor],
                states: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Module surgery on every rank, a new OSS over the new parameters with the change's param-group rules
        (as DDP), every untouched parameter's state moved from its old owner to its new one bit for bit, `states`
        installed on the new owners, a new ShardedDDP. Returns how many states moved and their bytes."""
        old_modules, changed, rebased = self.change_names(change)
        me = self._rank()
        with Coordinator().shared_failure(f"{change.kind} rebuild (module surgery, OSS)"):
            old_owner = {n: r for n, r in self.owners().items() if n not in changed}
            mine = {n: s for n, s in self.local_states().items() if n in old_owner}  # dropped with the old OSS next
            self.layout.refresh(self.optimizer.param_groups)
            scheduler = self.scheduler
            self.release()
            self.swap_layers(change, modules, values, old_modules)
            del old_modules
            maybe_fault("rebuild")
            named = dict(self.module.named_parameters())
            companions = bool(rebased) and change.lr_scale != 1.0
            origins = [Origin(i) for i in range(len(self.layout))]
            if rebased:
                self.layout, origins = self.layout.rebase(rebased, named, companions=companions,
                                                          lr_scale=change.lr_scale)
            self.optimizer = rebuilt_optimizer(self.optimizer_factory, self.layout, named)
            new_owner = self.owners()
            moves = sorted((n, old_owner[n], new_owner[n]) for n in old_owner
                           if n in new_owner and old_owner[n] != new_owner[n])
        received, moved_bytes = self._move_states(moves, mine)
        with Coordinator().shared_failure(f"{change.kind} rebuild (state transplant)"):
            maybe_fault("transplant")
            held = self.held_states
            for name, owner in new_owner.items():
                if owner != me:
                    continue
                state = received.get(name) if name in received else mine.get(name) if name in old_owner else None
                if name in states:
                    param = named[name]
                    state = {k: v.reshape(param.shape).to(param.device) if isinstance(v, torch.Tensor) and v.dim() > 0
                             else v for k, v in states[name].items()}
                if state:
                    _check_shapes(name, state, named[name])
                    held[named[name]] = state
            del mine, received
            if scheduler is not None:  # at its position; per-group lists follow their groups (companions: sources')
                rebind_scheduler(scheduler, self.optimizer,
                                 origins if companions else [Origin(i) for i in range(len(self.layout))])
            self.scheduler = scheduler
        self.model = self.wrap(self.module)
        return {"moved_states": len(moves), "moved_state_bytes": moved_bytes}

    def _move_states(self, moves: list[tuple[str, int, int]], mine: dict[str, dict[str, Any]]
                     ) -> tuple[dict[str, dict[str, Any]], int]:
        """Collective: each moving state from its old owner to its new one. One all-gather of what the states
        hold (keys, shapes, dtypes, CPU scalars), then per (old owner, new owner, dtype) one flat point-to-point
        message. Returns the states this rank received and the bytes moved (all ranks)."""
        me = self._rank()
        outgoing = {n: _describe(mine[n]) for n, src, _ in moves if src == me and mine.get(n)}
        described: dict[str, dict] = {}
        for part in Coordinator(None if self._group is dist.group.WORLD else self._group).gather_objects(outgoing):
            described.update(part)
        pairs: dict[tuple[int, int, str], list[tuple[str, str]]] = {}
        for name, src, dst in moves:
            for key, (kind, spec) in sorted(described.get(name, {}).items()):
                if kind == _FLAT:
                    pairs.setdefault((src, dst, str(spec[1])), []).append((name, key))
        received: dict[str, dict[str, Any]] = {}
        for name, src, dst in moves:
            if dst == me and name in described:
                received[name] = {k: (s.clone() if isinstance(s, torch.Tensor) else s)
                                  for k, (kind, s) in described[name].items() if kind == _SCALAR}
        works, inbox, total = [], [], 0
        device = comm_device()
        for (src, dst, _), entries in sorted(pairs.items()):
            specs = [described[n][k][1] for n, k in entries]
            numel = sum(int(torch.Size(shape).numel()) for shape, _, _ in specs)
            total += numel * specs[0][1].itemsize
            if src == me:
                flat = torch.cat([mine[n][k].detach().reshape(-1).to(device) for n, k in entries])
                works.append(dist.isend(flat, dst=_global(self._group, dst), group=self._group))
                inbox.append(flat)  # keep the buffer alive until the send completes
            elif dst == me:
                flat = torch.empty(numel, dtype=specs[0][1], device=device)
                works.append(dist.irecv(flat, src=_global(self._group, src), group=self._group))
                inbox.append((flat, entries, specs))
        for work in works:
            work.wait()
        param_device = {n: p.device for n, p in self.module.named_parameters()}
        for item in inbox:
            if not isinstance(item, tuple):
                continue
            flat, entries, specs = item
            start = 0
            for (name, key), (shape, _, on_cpu) in zip(entries, specs):
                size = int(torch.Size(shape).numel())
                received[name][key] = flat[start:start + size].reshape(shape).clone().to(
                    "cpu" if on_cpu else param_device[name])
                start += size
        return received, total

    def _state_device(self, param: torch.Tensor, value: torch.Tensor) -> torch.device:
        """Where a loaded state tensor lives: moments on the parameter's device; a 0-dim one (Adam's step) on the
        CPU unless its group is capturable / fused (torch's own rule in Optimizer.load_state_dict)."""
        if value.dim() > 0:
            return param.device
        for group in self.optimizer.optim.param_groups:
            if any(p is param for p in group["params"]):
                return param.device if group.get("capturable") or group.get("fused") else torch.device("cpu")
        return torch.device("cpu")

    def step(self) -> None:
        """OSS step (each rank updates what it owns, then broadcasts it), ShardedDDP's zero_grad (keeps bucketed
        gradients as views of their buckets), scheduler."""
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (collective): OSS reduces the norms of the owners' gradients; a plain
        `clip_grad_norm_` would see only this rank's share."""
        return self.optimizer.clip_grad_norm(max_norm)

    def release(self) -> None:
        """Remove the old wrapper's gradient hooks (see the module docstring), then drop wrapper, OSS, scheduler."""
        if self.model is not None:
            _remove_hooks(self.model)
        super().release()

    # -- checkpoints: optimizer state sharded by owner, by parameter name ------------------------------
    SHARD_FILE = "fairscale_optim_rank{rank:05d}.pt"

    def save_state(self, directory: Path, manifest_json: str) -> None:
        """Every rank writes the states it owns; rank 0 also the module, group hyper-parameters, scheduler and
        the names that have state (a loader checks it found each of them)."""
        directory = Path(directory)
        names = sorted(self.local_states())
        everyone = Coordinator().gather_objects(names) if is_distributed() else [names]
        me = Coordinator().rank
        torch.save({"rank": me, "state": self.local_states()}, directory / self.SHARD_FILE.format(rank=me))
        if me != 0:
            return
        torch.save({"manifest": manifest_json, "model": self.module.state_dict(),
                    "param_groups": group_hyperparams(self.optimizer), "world_size": len(everyone),
                    "stateful": sorted(n for part in everyone for n in part),
                    "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None},
                   directory / self.STATE_FILE)

    def load_state(self, directory: Path, engine_meta: Optional[dict[str, Any]] = None) -> None:
        """Module on every rank; from every shard file, the states of the parameters this rank owns now (any
        world size); hyper-parameters and scheduler."""
        directory = Path(directory)
        path = directory / self.STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (checkpoint written by another backend?)")
        device = next(self.module.parameters()).device
        main = torch.load(path, map_location=device, weights_only=False)
        load_module_state(self.module, main["model"], path)
        named = dict(self.module.named_parameters())
        owner, me = self.owners(), self._rank()
        wanted = {n for n in main["stateful"] if owner.get(n) == me}
        unknown = sorted(set(main["stateful"]) - set(named))
        if unknown:
            raise CheckpointError(f"{path}: optimizer state for {unknown[:3]}, which the model does not have")
        held = self.held_states
        held.clear()
        for rank in range(int(main["world_size"])):
            shard = directory / self.SHARD_FILE.format(rank=rank)
            if not shard.is_file():
                raise CheckpointError(f"{shard}: missing (the checkpoint was written by {main['world_size']} ranks)")
            part = torch.load(shard, map_location="cpu", weights_only=False, mmap=True)["state"]
            for name in sorted(wanted & set(part)):
                param = named[name]
                state = {k: v.clone().to(self._state_device(param, v)) if isinstance(v, torch.Tensor) else v
                         for k, v in part[name].items()}
                _check_shapes(name, state, param, source=shard)
                held[param] = state
                wanted.discard(name)
        if wanted:
            raise CheckpointError(f"{directory}: no shard holds the optimizer state of {sorted(wanted)[:3]}")
        try:
            restore_group_hyperparams(self.optimizer, main["param_groups"])
        except Exception as exc:
            raise CheckpointError(f"{path}: optimizer state does not fit the model: {exc}") from exc
        for outer, inner in zip(self.optimizer.param_groups, self.optimizer.optim.param_groups):
            inner.update({k: v for k, v in outer.items() if k != "params"})
        if self.scheduler is not None and main["scheduler"] is not None:
            self.scheduler.load_state_dict(main["scheduler"])


def _global(group: Any, rank: int) -> int:
    """The global rank of `rank` in `group` (collectives take global ranks)."""
    return rank if group is None or group is dist.group.WORLD else dist.get_global_rank(group, rank)


def _describe(state: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """What a state holds, for a receiver to allocate it: (flat, (shape, dtype, on_cpu)) per tensor that travels in
    a flat buffer, (scalar, value) for numbers and CPU 0-dim tensors (Adam's step) that travel in the descriptor."""
    out: dict[str, tuple[str, Any]] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and not (value.dim() == 0 and value.device.type == "cpu"):
            out[key] = (_FLAT, (tuple(value.shape), value.dtype, value.device.type == "cpu"))
        else:
            out[key] = (_SCALAR, value.detach().clone() if isinstance(value, torch.Tensor) else value)
    return out


def _check_shapes(name: str, state: dict[str, Any], param: torch.Tensor, source: Any = None) -> None:
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
            where = f"{source}: " if source is not None else ""
            raise (CheckpointError if source is not None else DistLowRankError)(
                f"{where}{name}: optimizer state {key} has shape {tuple(value.shape)}, parameter {tuple(param.shape)}")


def _remove_hooks(wrapper: Any) -> None:
    """Remove a ShardedDataParallel's gradient hooks (it re-registers them at its next forward, if it has one)."""
    hooks = getattr(wrapper, "_grad_hooks", None)
    while hooks:
        hooks.pop().remove()
    if hooks is not None:
        wrapper._grad_accs = []
        wrapper._manual_reduce = []


def _sdp_settings(wrapper: Any) -> dict[str, Any]:
    """The keywords a user's ShardedDataParallel was built with, read back from it (see the module docstring)."""
    out = {key: getattr(wrapper, attr) for key, attr in _SDP_SETTINGS.items() if hasattr(wrapper, attr)}
    if not getattr(wrapper, "_use_buckets", True):
        out["reduce_buffer_size"] = 0
    if getattr(wrapper, "_process_group", None) is not dist.group.WORLD:
        out["process_group"] = wrapper._process_group
    return out
