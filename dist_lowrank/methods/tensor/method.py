"""Bayesian tensorized training as a Method: after every optimizer step each rank slot's scale λ_k takes its EM
update from the slices' sums of squares (`update`, collective), the next forward's prior term is weighted by the
new λ (`loss_term`, on every engine), and every `prune_every` steps the slots whose λ fell below the threshold are
removed for real through the shape-change pipeline (`decide` → `shape_change`: Slice of every core).

The sums come from the pieces of each core this rank holds (`engine.param_views`: whole replicas on DDP and
ZeRO-1/2, row shards on FSDP2, flat partitions on ZeRO-3): replicas need no communication; sharded engines sum
all layers' small vectors in one all-reduce. λ is then the same on every rank, so the prune plan is too (the
coordinator checks it). A `rank_update` event (slots per layer, their total as the layer's rank, parameters)
starts the run and follows every prune, so the report and TensorBoard draw each layer's trajectory; a `prior`
event every step gives the prior's weight and each layer's effective rank (its slots with λ ≥ threshold, the rank
the next prune would keep), so the run shows where λ is heading between prunes.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from dist_lowrank.errors import ConfigError
from dist_lowrank.methods.base import Method, Probe
from dist_lowrank.methods.tensor import formats
from dist_lowrank.methods.tensor.layer import TensorizedEmbedding, TensorizedLinear
from dist_lowrank.methods.tensor.model import tensor_layers, to_tensorized
from dist_lowrank.methods.tensor.prior import damped, em_scales, kl_weight, slice_weights
from dist_lowrank.methods.tensor.reshape import prune_change
from dist_lowrank.methods.tensor.rule import kept_slots
from dist_lowrank.plan import Plan
from dist_lowrank.reshape.change import ShapeChange


class TensorMethod(Method):
    name = "tensor"

    def __init__(self, cfg, targets: dict[str, nn.Module], dims: dict[str, tuple[int, int]],
                 finished: bool = False) -> None:
        super().__init__(cfg, targets, dims)
        self.finished = finished
        self.ranks = {n: sum(s.ranks) for n, s in self.specs.items()}
        self.scales: dict[str, list[torch.Tensor]] = {}  # layer -> per rank group, λ (fp64, equal on every rank)
        self.scale_bytes = 0      # this rank's payload in the last λ all-reduce (0 where weights are replicated)
        self.weight = 0.0         # the prior's weight in the next forward
        self.step = 0             # the optimizer step of the last update
        self._engine: Any = None  # the engine of the last update (its model after a reshard)
        self._emit = lambda event: None

    @property
    def specs(self) -> dict[str, formats.TensorSpec]:
        """Each target's current format, modes and ranks (the layers hold them; a prune replaces the layers)."""
        return {n: m.spec for n, m in self.targets.items()}

    @classmethod
    def create(cls, cfg, engine: Any, steps_per_epoch: Optional[int] = None, finished: bool = False) -> "TensorMethod":
        layers = tensor_layers(engine.unwrapped_model())
        if not layers:
            raise ConfigError("lowrank.strategy: 'tensor' needs a model converted with dist_lowrank.prepare_model "
                              "(or methods.tensor.model.to_tensorized) before the engine is built")
        return cls(cfg, layers, {n: (m.spec.rows, m.spec.cols) for n, m in layers.items()}, finished=finished)

    @classmethod
    def prepare_model(cls, model: nn.Module, cfg) -> nn.Module:
        return to_tensorized(model, cfg)

    @classmethod
    def layer_for_layout(cls, module: nn.Module, entry: dict) -> Optional[nn.Module]:
        if entry.get("type") != TensorizedLinear.LAYOUT_TYPE:
            return None
        reference = next(module.parameters())
        kw = {"device": reference.device, "dtype": reference.dtype}
        if entry.get("kind") == "embedding":
            return TensorizedEmbedding.from_layout(module.num_embeddings, module.embedding_dim, entry, **kw)
        return TensorizedLinear.from_layout(module.in_features, module.out_features, entry,
                                            bias=getattr(module, "bias", None) is not None, **kw)

    @classmethod
    def check_run(cls, cfg, sharded_parameters: bool) -> None:
        t = cfg.tensor
        if t.min_rank > t.init_rank:
            raise ConfigError(f"lowrank.tensor.min_rank: {t.min_rank} > init_rank {t.init_rank}")

    @property
    def done(self) -> bool:
        return self.finished

    # -- every step ------------------------------------------------------------------------------------
    def start(self, probe: Probe) -> None:
        """λ of the initial cores (the plain M-step), the prior's weights for the first forward, the first ranks."""
        self._engine, self._emit = probe.engine, probe.emit
        if not self.scales:  # a resumed run brought its own
            self.scales = self._em(self._slice_sums(probe))
        self._arm(step=0)
        self._log_ranks(0)

    def update(self, step: int, probe: Probe) -> None:
        self._engine, self._emit = probe.engine, probe.emit
        if self.finished:
            return
        new = self._em(self._slice_sums(probe))
        stepsize = self.cfg.tensor.em_stepsize
        self.scales = {n: [damped(old, lam, stepsize) for old, lam in zip(self.scales[n], new[n])] for n in new}
        self._arm(step)
        self._emit({"event": "prior", "step": step, "kl_weight": self.weight,
                    "effective_ranks": {n: sum(int((lam >= self.cfg.tensor.threshold).sum()) for lam in groups)
                                        for n, groups in sorted(self.scales.items())}})

    def _slice_sums(self, probe: Probe) -> dict[str, list[torch.Tensor]]:
        """Per layer and rank group, Σ of squared entries of each slot's prior slices, over the whole cores:
        computed from this rank's pieces on their device, summed over ranks in one all-reduce where the cores are
        sharded, and brought to the host once (one sync per step, not one per core)."""
        names = sorted(self.targets)
        params = [f"{n}.core_{i}" for n in names for i in range(len(self.targets[n].cores))]
        views = dict(zip(params, probe.engine.param_views(params)))
        flat: list[torch.Tensor] = []
        sizes: dict[str, int] = {}
        for name in names:
            spec = self.targets[name].spec
            shapes = formats.core_shapes(spec)
            groups = formats.rank_groups(spec)
            sizes[name] = len(groups)
            for group in groups:
                pieces = []
                for core, dim in group.prior:
                    view = views[f"{name}.core_{core}"]
                    pieces.append(formats.flat_slice_sums(shapes[core], dim, view.flat_offset, view.local_flat,
                                                          group.size).double())
                flat.append(torch.stack(pieces).sum(0))
        self.scale_bytes = 0
        if any(not v.replicated for v in views.values()):
            flat = probe.coordinator.sum_tensors(flat)
            self.scale_bytes = 8 * sum(t.numel() for t in flat)
        host = torch.cat(flat).cpu().split([t.numel() for t in flat]) if flat else ()
        it = iter(host)
        return {name: [next(it) for _ in range(sizes[name])] for name in names}

    def _em(self, sums: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        t = self.cfg.tensor
        return {name: [em_scales(m, d, t.prior, t.eta) for m, d in zip(groups, formats.slice_counts(self.specs[name]))]
                for name, groups in sums.items()}

    def _arm(self, step: int) -> None:
        """Give every layer the prior's per-slot weights w(step + 1) / (2 λ_k) for its next forward."""
        self.step = step
        self.weight = kl_weight(step + 1, self.cfg.tensor)
        for name, layer in self.targets.items():
            layer.prior_weights = slice_weights(self.scales[name], self.weight) if self.weight > 0 else None

    def loss_term(self, model: nn.Module) -> Optional[torch.Tensor]:
        """The prior's terms of the last forward, taken from the layers (each forward's term enters one loss)."""
        terms = []
        for layer in self.targets.values():
            if layer.penalty is not None:
                terms.append(layer.penalty)
                layer.penalty = None
        return torch.stack(terms).sum() if terms else None

    def due(self, step: int) -> bool:
        t = self.cfg.tensor
        return not self.finished and step >= t.prune_after and step % t.prune_every == 0

    def measure(self, step: int, probe: Probe) -> dict[str, list[list[float]]]:
        return {n: [lam.tolist() for lam in groups] for n, groups in sorted(self.scales.items())}

    def decide(self, step: int, measurement: dict[str, list[list[float]]]) -> Optional[Plan]:
        """Per layer and group, the slots with λ ≥ threshold (at least min_rank: the largest λ); a plan when any
        slot goes."""
        t, keep = self.cfg.tensor, {}
        for name, groups in measurement.items():
            kept = kept_slots(groups, t.threshold, t.min_rank)
            if any(len(k) < len(lam) for k, lam in zip(kept, groups)):
                keep[name] = kept
        if not keep:
            return None
        return Plan("prune", step, {n: sum(len(k) for k in kept) for n, kept in keep.items()}, keep=keep)

    def shape_change(self, plan: Plan, model: nn.Module) -> Optional[ShapeChange]:
        return prune_change(tensor_layers(model), {n: plan.keep[n] for n in sorted(plan.keep)}, plan.step)

    def committed(self, plan: Plan, measurements: dict[str, Any]) -> dict[str, Any]:
        """λ sliced like the cores; the new layers (the reshard built them) get their specs and prior weights."""
        layers = tensor_layers(self._engine.unwrapped_model())
        for name, kept in plan.keep.items():
            self.scales[name] = [lam[torch.tensor(k, dtype=torch.long)] for lam, k in zip(self.scales[name], kept)]
        self.targets = {n: layers[n] for n in self.targets}
        self.ranks = {n: sum(s.ranks) for n, s in self.specs.items()}
        self._arm(plan.step)
        self._log_ranks(plan.step)
        return {"ranks": dict(plan.ranks), "slots": {n: list(self.specs[n].ranks) for n in plan.keep},
                "measurements": measurements}

    def _log_ranks(self, step: int) -> None:
        self._emit({"event": "rank_update", "step": step, "ranks": dict(self.ranks),
                    "slots": {n: list(s.ranks) for n, s in self.specs.items()},
                    "params": {n: formats.n_params(s) for n, s in self.specs.items()},
                    "scale_bytes": self.scale_bytes, "kl_weight": self.weight})

    # -- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """λ as float lists (JSON floats round-trip exactly: a resumed run prunes at the same steps)."""
        return {"step": self.step, "scales": {n: [lam.tolist() for lam in groups] for n, groups in self.scales.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """λ of the checkpoint's step, and the layers armed for the next forward as the saved run had them."""
        self.scales = {n: [torch.tensor(lam, dtype=torch.float64) for lam in groups]
                       for n, groups in state.get("scales", {}).items()}
        if self.scales:
            self._arm(int(state.get("step", 0)))
