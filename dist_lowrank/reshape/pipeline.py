"""The one pipeline that carries out every change of shape (switch, growth, fold, shrink, ...) on every engine.

For a `ShapeChange` (reshape.change), every rank, in change order:
1. builds each layer's new module under the meta device (its shapes; the engine allocates it);
2. computes the Factor ops' factors: each layer's m×n matrix is gathered (`backend.gather`, collective), its owner
   rank runs the truncated SVD and broadcasts the factors (`reshape.factorize`: no rank holds more than one full
   layer beyond its shards);
3. gathers the sources of the other ops and computes the new full values (`value_of`), and reads the optimizer
   state the change carries (`backend.full_state`, collective) — sliced, embedded, rotated (`state_of`) or, for
   factors, projected from the weight's moments (`linalg.moments.project_state`);
4. hands modules, values and states to `backend.rebuild`, the only engine-specific step.
The change is measured here, once, for every engine: seconds, parameters before/after, peak RSS during it.
"""
from __future__ import annotations

import gc
import resource
import time
from typing import Any, Optional

import torch

from dist_lowrank.backends.ds_memory import RssPeak
from dist_lowrank.device import comm_device
from dist_lowrank.errors import DistLowRankError
from dist_lowrank.linalg.moments import project_state
from dist_lowrank.reshape.change import Factor, Keep, LayerChange, ShapeChange, state_of, value_of
from dist_lowrank.reshape.factorize import factorize_spread
from dist_lowrank.surgery import count_parameters


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(backend: Any, change: ShapeChange) -> dict[str, Any]:
    """Carry out `change` on `backend` (collective: every rank calls it with the same change)."""
    start, rss_before = time.perf_counter(), peak_rss_mb()
    with RssPeak() as rss:
        model = backend.unwrapped_model()
        params_before = count_parameters(model)
        modules = dict(model.named_modules())
        missing = [layer.name for layer in change.layers if layer.name not in modules]
        if missing:
            raise DistLowRankError(f"shape change at step {change.step}: no layer named {missing[0]!r} in the model")
        with torch.device("meta"):
            built = {layer.name: layer.build(modules[layer.name]) for layer in change.layers}
        factors = _factors(backend, change, modules)
        values: dict[str, torch.Tensor] = {}
        states: dict[str, dict] = {}
        for layer in change.layers:
            _layer_values(backend, layer, modules[layer.name], built[layer.name], factors.get(layer.name),
                          values, states)
        del factors
        result = dict(backend.rebuild(change, built, values, states))
        del values, states, built, modules
        gc.collect()
    result.update({"seconds": time.perf_counter() - start, "params_before": params_before,
                   "params_after": count_parameters(backend.unwrapped_model()), "layers": len(change.layers),
                   "peak_rss_mb": peak_rss_mb(), "peak_rss_growth_mb": peak_rss_mb() - rss_before,
                   "peak_rss_delta_mb": rss.delta_mb})
    return result


def _factors(backend: Any, change: ShapeChange, modules: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (A, B)} for the layers with Factor ops, identical on every rank."""
    layers = {layer.name: layer for layer in change.layers
              if any(isinstance(p.value, Factor) for p in layer.params.values())}
    if not layers:
        return {}
    for layer in layers.values():
        if layer.rank is None or layer.matrix is None:
            raise DistLowRankError(f"{layer.name}: a Factor op needs the layer change's rank and matrix")
    names = sorted(layers)
    dtype = backend.values_dtype(next(modules[names[0]].parameters()))
    return factorize_spread(names, {n: layers[n].rank for n in names},
                            lambda name: layers[name].matrix(modules[name], backend.gather),
                            dtype=dtype, device=comm_device())


def _layer_values(backend: Any, layer: LayerChange, old_module: torch.nn.Module, new_module: torch.nn.Module,
                  factors: Optional[tuple[torch.Tensor, torch.Tensor]], values: dict, states: dict) -> None:
    """The full value and optimizer state of every new parameter of one layer (collective reads, fixed order)."""
    old_params = dict(old_module.named_parameters())
    new_params = dict(new_module.named_parameters())
    extra = sorted(set(new_params) ^ set(layer.params))
    if extra:
        raise DistLowRankError(f"{layer.name}: the change describes {sorted(layer.params)}, the new module has "
                               f"{sorted(new_params)}")
    sources = sorted(layer.sources())
    old = {src: backend.gather(old_params[src]).detach() for src in sources}
    carried = sorted({p.value.source for p in layer.params.values()
                      if p.state == "same" and not isinstance(p.value, (Keep, Factor))})
    old_states = {src: backend.full_state(old_params[src]) for src in carried}
    projected = _projected(backend, layer, old_module, old_params, factors)
    for leaf, param_change in sorted(layer.params.items()):
        if isinstance(param_change.value, Keep):
            continue
        shape = tuple(new_params[leaf].shape)
        name = f"{layer.name}.{leaf}"
        values[name] = value_of(param_change.value, old, factors, shape)
        state = state_of(param_change, old_states, shape, projected.get(leaf))
        if state:
            states[name] = state


def _projected(backend: Any, layer: LayerChange, old_module, old_params: dict,
               factors: Optional[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict]:
    """{leaf: state} for Factor params whose state is "project": the weight's moments, read in the layer's matrix
    orientation (`layer.matrix` with a reader that returns the moment), projected onto A and B."""
    wanted = {leaf: p.value.side for leaf, p in layer.params.items()
              if p.state == "project" and isinstance(p.value, Factor)}
    if not wanted:
        return {}
    if set(wanted.values()) - {"a", "b"}:
        raise DistLowRankError(f"{layer.name}: projected moments exist for the factors a, b only, not "
                               f"{sorted(set(wanted.values()) - {'a', 'b'})}")
    if "weight" not in old_params or factors is None:
        raise DistLowRankError(f"{layer.name}: projected factor moments need a dense layer with a weight "
                               f"(use lowrank.switch.factor_moments: zero)")
    state = backend.full_state(old_params["weight"])
    if not state:
        return {}
    matrix = {key: layer.matrix(old_module, lambda _p, v=value: v) if isinstance(value, torch.Tensor)
              and value.dim() > 0 else value for key, value in state.items()}
    state_a, state_b = project_state(matrix, *factors)
    return {leaf: state_a if side == "a" else state_b for leaf, side in wanted.items()}
