"""DLRT as a Method: after every optimizer step the integrator moves each DLRT layer to new bases and a truncated
core (`update`, collective); when a rank outgrows its layer's capacity, or stays well below it for a while, the
capacity changes through the shape-change pipeline (`decide` → `shape_change`: Embed / Slice).

Per layer and step, in name order on every rank: the five factors gathered as full fp32 tensors (engine.gather),
the new directions and the augmented core computed on every rank, the core's SVD and the truncation rank taken
from rank 0 (one broadcast, so the decision is identical even where replicas differ in the last bits), then the
new U, S, V, K, L and their rotated (or reset) moments written back (engine.write). With start=switch the model
first trains dense: Cuttlefish's detector (stable ranks every cadence, the `lowrank.cuttlefish` section) picks the
step and a rank per layer, the switch (`reshape.switch_change`) writes each weight's truncated SVD into DLRT layers,
and the integrator adapts the ranks from the next step on. The integrator's own traffic
(gathers, the broadcast, KLS's all-reduce) is counted in bytes; a `rank_update` event (ranks, wanted ranks,
capacities, bytes) is emitted whenever they change, so the report and TensorBoard draw each layer's trajectory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from dist_lowrank.errors import ConfigError
from dist_lowrank.methods.base import Method, Probe
from dist_lowrank.methods.dlrt import integrator, rows
from dist_lowrank.methods.dlrt.layer import DLRTLinear
from dist_lowrank.methods.cuttlefish.reference import cuttlefish_strategy
from dist_lowrank.methods.rule import Strategy
from dist_lowrank.methods.dlrt.model import check_supported, dlrt_layers, empty_dlrt_like, max_rank_of, to_dlrt
from dist_lowrank.methods.dlrt.reshape import capacity_change, switch_change
from dist_lowrank.methods.dlrt.rule import CapacityRule, capacity_for
from dist_lowrank.methods.switching import cadence_steps
from dist_lowrank.plan import Plan
from dist_lowrank.reshape.change import ParamChange, Rotate, ShapeChange, state_of

LEAVES = ("u", "v", "s", "k", "l")


def _pad(matrix: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = matrix.new_zeros(rows, cols)
    out[: matrix.shape[0], : matrix.shape[1]] = matrix
    return out


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _half(layer: DLRTLinear) -> bool:
    return layer.u.dtype in (torch.float16, torch.bfloat16)


def _placed(rows: torch.Tensor, first: int, total: int) -> torch.Tensor:
    """This rank's rows at their place in a zero (total × cols) matrix: summed over the ranks, the whole matrix."""
    out = rows.new_zeros(total, rows.shape[1])
    out[first: first + rows.shape[0]] = rows
    return out


@dataclass
class _Pending:
    """One layer between its augmented core and the agreed truncation: the bases as this rank holds them (all
    rows, or its row block)."""

    name: str
    layer: DLRTLinear
    core: torch.Tensor
    u_aug: torch.Tensor
    v_aug: torch.Tensor
    by_rows: bool


class DLRTMethod(Method):
    name = "dlrt"

    def __init__(self, cfg, targets: dict[str, nn.Module], dims: dict[str, tuple[int, int]],
                 finished: bool = False, warmup: Optional[Strategy] = None, cadence: int = 1) -> None:
        super().__init__(cfg, targets, dims)
        self.finished = finished
        self.warmup, self.cadence = warmup, cadence  # start=switch: the dense phase's detector, until the switch
        self.ranks = {} if warmup else {n: m.rank for n, m in targets.items()}
        self.capacities = {} if warmup else {n: m.capacity for n, m in targets.items()}
        self.wanted: dict[str, int] = dict(self.ranks)   # the rank the tolerance asked for at the last step
        self.rule = CapacityRule(cfg.dlrt, dims, {n: max_rank_of(cfg, *d) for n, d in dims.items()})
        self.last_step = 0
        self.integrator_bytes = 0  # this rank's payload in the integrator's collectives, last step
        self.integrator_bytes_total = 0
        self._last_logged: Optional[tuple] = None  # (ranks, wanted, capacities) of the last rank_update event
        self._engine: Any = None   # the engine of the last update (its model after a reshard)
        self._world = 1

    @classmethod
    def create(cls, cfg, engine: Any, steps_per_epoch: Optional[int] = None, finished: bool = False) -> "DLRTMethod":
        if finished:
            return cls(cfg, {}, {}, finished=True)
        layers = dlrt_layers(engine.unwrapped_model())
        if not layers and cfg.dlrt.start == "switch":  # dense warm-up first
            targets, dims = cls.select(cfg, engine.unwrapped_model(), engine)
            for name, module in targets.items():
                check_supported(name, module)
            return cls(cfg, targets, dims, warmup=cuttlefish_strategy(cfg.cuttlefish, dims, cfg.min_rank),
                       cadence=cadence_steps(cfg, steps_per_epoch))
        if not layers:
            raise ConfigError("lowrank.strategy: 'dlrt' needs a model converted with dist_lowrank.prepare_model "
                              "(or methods.dlrt.model.to_dlrt) before the engine is built")
        method = cls(cfg, dict(layers), {n: (m.out_features, m.in_features) for n, m in layers.items()})
        method.set_modes(layers.values())
        return method

    @classmethod
    def prepare_model(cls, model: nn.Module, cfg) -> nn.Module:
        return model if cfg.dlrt.start == "switch" else to_dlrt(model, cfg)

    @classmethod
    def layer_for_layout(cls, module: nn.Module, entry: dict) -> Optional[nn.Module]:
        if entry.get("type") != DLRTLinear.LAYOUT_TYPE:
            return None
        reference = next(module.parameters())
        return empty_dlrt_like(module, int(entry["rank"]), int(entry["capacity"]), device=reference.device,
                               dtype=reference.dtype)

    @classmethod
    def check_run(cls, cfg, sharded_parameters: bool) -> None:
        if cfg.dlrt.integrate_every > 1 and cfg.dlrt.integrator == "kls":
            raise ConfigError("lowrank.dlrt.integrate_every: > 1 needs integrator 'parallel' (KLS's core block is "
                              "the step's own activations)")
        if cfg.dlrt.min_rank > cfg.dlrt.init_rank:
            raise ConfigError(f"lowrank.dlrt.min_rank: {cfg.dlrt.min_rank} > init_rank {cfg.dlrt.init_rank}")
        if cfg.dlrt.max_rank is not None and cfg.dlrt.max_rank < cfg.dlrt.min_rank:
            raise ConfigError(f"lowrank.dlrt.max_rank: {cfg.dlrt.max_rank} < min_rank {cfg.dlrt.min_rank}")

    @property
    def done(self) -> bool:
        return self.finished

    def set_modes(self, layers) -> None:
        """What the layers' backward keeps (KLS: each step's (x, gy) pairs) and whether only S still trains; set
        again after every reshard (new modules)."""
        for layer in layers:
            layer.record = self.cfg.dlrt.integrator == "kls" and not self.finished
            layer.s_only = self.finished
            if not layer.record:
                layer.records = None

    # -- every step ------------------------------------------------------------------------------------
    def start(self, probe: Probe) -> None:
        if self.warmup is not None:  # Cuttlefish's init measurement
            self.warmup.observe(0, probe.stable_ranks(0, list(self.targets)))

    def update(self, step: int, probe: Probe) -> None:
        self._engine = probe.engine
        if self.warmup is not None:
            return  # still dense: the optimizer's step is the whole step
        if step % self.cfg.dlrt.integrate_every and not self._adapting_ends(step):
            self.integrator_bytes = 0
            return  # K, L, S took their optimizer step on the current bases; the integrator runs every n steps
        start = time.perf_counter()
        self.last_step, self.integrator_bytes = step, 0
        self._world = probe.coordinator.world_size
        layers = dlrt_layers(probe.engine.unwrapped_model())
        adapting = not self._adapting_ends(step)
        names = sorted(self.targets)
        by_rows = bool(names) and all(probe.engine.row_shard(layers[n].u) is not None for n in names)
        pending = (self._prepare_rows(names, layers, probe) if by_rows
                   else [self._prepare_full(n, layers[n], probe) for n in names])
        for item, svd in zip(pending, self._agree(pending, probe.coordinator)):
            self._finish(item, svd, probe.engine)
        if not adapting:  # the paper's fine-tuning phase: bases fixed, only S trains
            self.finished = True
            self.set_modes(layers.values())
        self.integrator_bytes_total += self.integrator_bytes
        state = (dict(self.ranks), dict(self.wanted), dict(self.capacities))
        if state != self._last_logged:  # trajectories are piecewise constant: log their changes, not every step
            self._last_logged = state
            probe.emit({"event": "rank_update", "step": step, "ranks": state[0], "wanted": state[1],
                        "capacities": state[2], "integrator_bytes": self.integrator_bytes,
                        "integrator_bytes_total": self.integrator_bytes_total, "by_rows": by_rows,
                        "seconds": time.perf_counter() - start})

    def _adapting_ends(self, step: int) -> bool:
        return self.cfg.dlrt.adaptive_steps is not None and step >= self.cfg.dlrt.adaptive_steps

    def _prepare_full(self, name: str, layer: DLRTLinear, probe: Probe) -> _Pending:
        """One layer's augmented core from its full factors (gathered where sharded; replicas use their own)."""
        engine, coordinator = probe.engine, probe.coordinator
        r = layer.rank
        full = {leaf: _at_least_fp32(engine.gather(getattr(layer, leaf))) for leaf in LEAVES}  # QR, SVD in fp32+
        self._count(engine.shards_parameters, sum(t.numel() for t in full.values()) * layer.s.element_size())
        u, v = full["u"][:, :r], full["v"][:, :r]
        if _half(layer):
            u, v = integrator.reorthonormalize(u), integrator.reorthonormalize(v)
        k1, l1, s1 = full["k"][:, :r], full["l"][:, :r], full["s"][:r, :r]
        u_new, v_new = integrator.new_directions(u, k1), integrator.new_directions(v, l1)
        cross = None
        if self.cfg.dlrt.integrator == "kls":
            local = layer.cross_block(u_new, v_new)
            cross = self._cross(engine, layer, coordinator.mean_tensor(local))
            self._count(True, _nbytes(local))
        core = integrator.augmented_core(k1, l1, s1, u_new, v_new, cross)
        return _Pending(name, layer, core, torch.cat([u, u_new], 1), torch.cat([v, v_new], 1), by_rows=False)

    def _prepare_rows(self, names: list[str], layers: dict[str, DLRTLinear], probe: Probe) -> list[_Pending]:
        """Every layer's augmented core from this rank's rows (FSDP2): U, V, K, L stay sharded; the sums the step
        needs are batched over all layers into a few all-reduces (methods.dlrt.rows); only S (c×c) is gathered."""
        engine, coordinator = probe.engine, probe.coordinator

        def reduce(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            self._count(True, sum(_nbytes(t) for t in tensors))
            return coordinator.sum_tensors(tensors)

        held = {n: {leaf: engine.row_shard(getattr(layers[n], leaf)) for leaf in ("u", "k", "v", "l")}
                for n in names}
        rank_of = {n: layers[n].rank for n in names}
        block = {n: {leaf: _at_least_fp32(rows[:, :rank_of[n]]) for leaf, (rows, _) in held[n].items()}
                 for n in names}
        cores_s = {}
        for n in names:
            s_full = engine.gather(layers[n].s)
            self._count(engine.shards_parameters, _nbytes(s_full))
            cores_s[n] = _at_least_fp32(s_full)[:rank_of[n], :rank_of[n]]
        half = [n for n in names if _half(layers[n])]
        if half:
            fixed = rows.reorthonormalize([block[n][leaf] for n in half for leaf in ("u", "v")], reduce)
            for i, n in enumerate(half):
                block[n]["u"], block[n]["v"] = fixed[2 * i], fixed[2 * i + 1]
        widths_u = [min(rank_of[n], self.dims[n][0] - rank_of[n]) for n in names]
        widths_v = [min(rank_of[n], self.dims[n][1] - rank_of[n]) for n in names]
        u_new = rows.new_directions([block[n]["u"] for n in names], [block[n]["k"] for n in names], widths_u, reduce)
        v_new = rows.new_directions([block[n]["v"] for n in names], [block[n]["l"] for n in names], widths_v, reduce)
        k1, l1 = [block[n]["k"] for n in names], [block[n]["l"] for n in names]
        top_right, bottom_left = rows.core_blocks(k1, l1, u_new, v_new, reduce)
        crosses: list[Optional[torch.Tensor]] = [None] * len(names)
        if self.cfg.dlrt.integrator == "kls":  # the batch's activations need whole Ũ, Ṽ: summed from row blocks
            def whole(parts, leaf):
                return [_placed(part, held[n][leaf][1], self.dims[n][0 if leaf == "u" else 1])
                        for n, part in zip(names, parts)]
            fulls = reduce(whole(u_new, "u") + whole(v_new, "v"))
            local = [layers[n].cross_block(fulls[i], fulls[len(names) + i]) for i, n in enumerate(names)]
            crosses = [self._cross(engine, layers[n], c / self._world) for n, c in zip(names, reduce(local))]
        out = []
        for i, n in enumerate(names):
            core = integrator.augmented_core(k1[i], l1[i], cores_s[n], u_new[i], v_new[i], crosses[i],
                                             top_right=top_right[i], bottom_left=bottom_left[i])
            out.append(_Pending(n, layers[n], core, torch.cat([block[n]["u"], u_new[i]], 1),
                                torch.cat([block[n]["v"], v_new[i]], 1), by_rows=True))
        return out

    def _agree(self, pending: list[_Pending], coordinator: Any) -> list[tuple]:
        """Every core's SVD and truncation rank, rank 0's on every rank, in one broadcast for all layers (the
        decision is identical even where replicas differ in the last bits)."""
        cfg, packed, shapes = self.cfg.dlrt, [], []
        for item in pending:
            p, sigma, qh = torch.linalg.svd(item.core)
            top = max_rank_of(self.cfg, *self.dims[item.name])
            wanted = integrator.truncation_rank(sigma, cfg.theta, cfg.absolute, cfg.min_rank, top)
            packed.append(torch.cat([p.reshape(-1), sigma, qh.reshape(-1), sigma.new_tensor([float(wanted)])]))
            shapes.append(item.core.shape)
        if not packed:
            return []
        flat = coordinator.broadcast_tensor(torch.cat(packed))
        self._count(True, _nbytes(flat))
        out, start = [], 0
        for a, b in shapes:
            k = min(a, b)
            p, sigma = flat[start: start + a * a].reshape(a, a), flat[start + a * a: start + a * a + k]
            qh = flat[start + a * a + k: start + a * a + k + b * b].reshape(b, b)
            wanted = int(flat[start + a * a + k + b * b])
            out.append(((p, sigma, qh), wanted))
            start += a * a + k + b * b + 1
        return out

    def _finish(self, item: _Pending, agreed: tuple, engine: Any) -> None:
        (svd, wanted), layer = agreed, item.layer
        r, c = layer.rank, layer.capacity
        rank = min(wanted, c)
        result = integrator.truncate(item.core, item.u_aug, item.v_aug, r, rank, svd=svd, wanted=wanted)
        self._write(layer, engine, result, c, item.by_rows)
        layer.set_rank(rank)
        self.ranks[item.name], self.wanted[item.name] = rank, wanted
        self.rule.observe(item.name, rank, c)

    def _write(self, layer: DLRTLinear, engine: Any, result: "integrator.Truncated", c: int, by_rows: bool) -> None:
        """New U, V, S, K = U S, L = V S at capacity c; moments of K, L, S rotated into the new coordinates. By
        rows: U, V, K, L and their moments are this rank's rows (no communication); S is written whole."""
        rows_u, rows_v = result.u.shape[0], result.v.shape[0]
        values = {"u": _pad(result.u, rows_u, c), "v": _pad(result.v, rows_v, c), "s": _pad(result.s, c, c),
                  "k": _pad(result.u @ result.s, rows_u, c), "l": _pad(result.v @ result.s, rows_v, c)}
        left, right = _pad(result.left, c, c), _pad(result.right, c, c)  # old coordinates -> new (zeros past r)
        rotations = {"k": Rotate("k", None, right), "l": Rotate("l", None, left), "s": Rotate("s", left.T, right)}
        for leaf, value in values.items():
            param = getattr(layer, leaf)
            local = by_rows and leaf != "s"
            state = None
            if leaf in rotations:
                old = engine.local_state(param) if local else engine.full_state(param)
                if old:
                    moments = {k: t for k, t in old.items() if isinstance(t, torch.Tensor) and t.dim() > 0}
                    if self.cfg.dlrt.moments == "rotate":
                        new = state_of(ParamChange(rotations[leaf]), {leaf: moments}, tuple(value.shape))
                    else:
                        new = {k: torch.zeros_like(t) for k, t in moments.items()}
                    state = {k: t for k, t in (new or {}).items() if isinstance(t, torch.Tensor) and t.dim() > 0}
                    if not local:
                        self._count(engine.shards_optimizer_state, sum(_nbytes(t) for t in moments.values()))
            if local:
                engine.write_rows(param, value, state)
            else:
                engine.write(param, value, state)

    def _count(self, communicated: bool, nbytes: int) -> None:
        """Add a collective's payload to this step's integrator bytes: only where it crosses ranks (a gather of
        a replicated parameter, or anything on one process, moves nothing)."""
        if communicated and self._world > 1:
            self.integrator_bytes += int(nbytes)

    def _cross(self, engine: Any, layer: DLRTLinear, mean: torch.Tensor) -> torch.Tensor:
        """KLS's fourth core block −λ ŨᵀGṼ from the ranks' mean of the recorded products: unscaled by the fp16 loss
        scale the backward ran with (the records hold scaled output gradients), zero if not finite."""
        block = -self._lr_of(engine, layer.s) * mean / engine.backward_scale()
        return block if bool(torch.isfinite(block).all()) else torch.zeros_like(block)

    @staticmethod
    def _lr_of(engine: Any, param: torch.Tensor) -> float:
        """The current lr of the param group that holds `param` (the first group where the engine keeps flat
        partitions instead of the parameters: ZeRO)."""
        groups = engine.optimizer.param_groups
        for group in groups:
            if any(p is param for p in group["params"]):
                return float(group["lr"])
        return float(groups[0]["lr"])

    def due(self, step: int) -> bool:
        if self.warmup is not None:
            return step % self.cadence == 0
        return step % self.cfg.dlrt.integrate_every == 0 or self._adapting_ends(step)

    def measure(self, step: int, probe: Probe) -> dict[str, Any]:
        if self.warmup is not None:
            return probe.stable_ranks(step, list(self.targets))
        return dict(self.wanted)

    def decide(self, step: int, measurement: dict[str, Any]) -> Optional[Plan]:
        if self.warmup is not None:
            return self._switch_plan(step, measurement)
        return self.rule.decide(step, measurement, dict(self.ranks), dict(self.capacities))

    def _switch_plan(self, step: int, sranks: dict[str, float]) -> Optional[Plan]:
        """Cuttlefish's switch decision, every target included: its rank rule on the last stable rank (where it
        would keep a layer dense, the rule's rank all the same: DLRT adapts it), clamped to [min_rank, max_rank]."""
        plan = self.warmup.observe(step, sranks)
        if plan is None:
            return None
        cfg, ranks, capacities = self.cfg.dlrt, {}, {}
        for name, (m, n) in sorted(self.dims.items()):
            history = self.warmup.history[name]
            rank = plan.ranks.get(name) or (self.warmup.choose_rank(name, history[-1]) if history else cfg.init_rank)
            top = max_rank_of(self.cfg, m, n)
            ranks[name] = max(min(rank, top), min(cfg.min_rank, top))
            capacities[name] = capacity_for(ranks[name], m, n, cfg.growth_factor, cfg.capacity_multiple, top)
        return Plan("switch", step, ranks, capacities=capacities, reasons=dict(plan.reasons))

    def shape_change(self, plan: Plan, model: nn.Module) -> Optional[ShapeChange]:
        if plan.kind == "switch":
            return switch_change(model, dict(plan.ranks), {n: plan.capacities[n] for n in plan.ranks}, plan.step)
        return capacity_change(dlrt_layers(model), dict(plan.ranks), dict(plan.capacities), plan.step)

    def committed(self, plan: Plan, measurements: dict[str, Any]) -> dict[str, Any]:
        if plan.kind == "switch":
            return self._switched(plan, measurements)
        self.capacities.update(plan.capacities)
        self.rule.resized(plan.capacities)
        self.set_modes(dlrt_layers(self._engine.unwrapped_model()).values())  # the reshard made new modules
        return {"ranks": dict(plan.ranks), "capacities": dict(plan.capacities), "measurements": measurements}

    def _switched(self, plan: Plan, measurements: dict[str, Any]) -> dict[str, Any]:
        """The dense phase is over: the switched layers are the targets from now on (a layer the switch's speed
        filter kept dense stays dense and untracked)."""
        layers = dlrt_layers(self._engine.unwrapped_model())
        dims = {n: list(self.dims[n]) for n in plan.ranks}
        self.targets = {n: layers[n] for n in plan.ranks}
        self.dims = {n: self.dims[n] for n in plan.ranks}
        self.ranks, self.capacities = dict(plan.ranks), {n: plan.capacities[n] for n in plan.ranks}
        self.wanted = dict(self.ranks)
        self.rule = CapacityRule(self.cfg.dlrt, self.dims, {n: max_rank_of(self.cfg, *d) for n, d in self.dims.items()})
        self.warmup = None
        self.set_modes(self.targets.values())
        return {"ranks": dict(plan.ranks), "capacities": dict(self.capacities), "reasons": dict(plan.reasons),
                "dims": dims, "measurements": measurements}

    # -- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.warmup is not None:
            return {"warmup": self.warmup.state_dict()}
        return {"wanted": dict(self.wanted), "last_step": self.last_step, **self.rule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.warmup is not None:
            self.warmup.load_state_dict(state["warmup"])
            return
        self.wanted.update(state.get("wanted", {}))
        self.rule.load_state_dict(state)
        self.last_step = int(state.get("last_step", 0))
