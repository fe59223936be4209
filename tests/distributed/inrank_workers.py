"""InRank growth workers on real ranks (module level for the spawn harness)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

INRANK = {"strategy": "inrank", "target_modules": ["2", "4"],
          "inrank": {"init_rank": 2, "warmup": 10, "gap": 5, "tau": 0.9, "buffer": 6, "capacity_multiple": 4,
                     "growth_factor": 1.5, "w0_mode": "frozen"}}
STEPS = 40


def untouched_state(backend, name: str = "0.weight") -> dict:
    """Full Adam moments (+ fp32 master under DeepSpeed) of a parameter no growth touches."""
    params = dict(backend.unwrapped_model().named_parameters())
    param = params[name]
    if hasattr(backend, "engine"):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        return {"fp32": safe_get_full_fp32_param(param).clone(),
                **{k: safe_get_full_optimizer_state(param, k).clone() for k in ("exp_avg", "exp_avg_sq")}}
    state = backend.optimizer.state[param]
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}


def _factors(backend, controller) -> dict:
    """Every InRank layer's full U, V, Adam moments, width, rank and seed (replicated engines: DDP)."""
    out = {}
    for name in ("2", "4"):
        layer = backend.unwrapped_model().get_submodule(name)
        moments = {leaf: {k: v.detach().clone() for k, v in backend.optimizer.state[getattr(layer, leaf)].items()
                          if k in ("exp_avg", "exp_avg_sq")} for leaf in ("u", "v")}
        out[name] = {"u": layer.u.detach().clone(), "v": layer.v.detach().clone(), "width": layer.rank,
                     "rank": controller.ranks.get(name), "seed": layer.seed, "moments": moments,
                     "dims": (layer.out_features, layer.in_features)}
    return out


def run_inrank(backend, controller, rank: int, world: int, batch: int, capture: bool = False) -> dict:
    """Train STEPS steps; record decisions, whether each growth left the function unchanged, losses; with
    `capture`, the factors just before and after the first growth that reshards."""
    from examples.common import digits

    probe = torch.rand(5, 64, generator=torch.Generator().manual_seed(3))
    batches = digits(rank, world, batch=batch)
    losses, unchanged, decisions, bitwise, growth = [], [], [], [], None
    for step in range(1, STEPS + 1):
        x, y = next(batches)
        loss = F.cross_entropy(backend.model(x), y)
        backend.backward(loss)
        backend.step()
        losses.append(float(loss.detach()))
        with torch.no_grad():
            before = backend.model(probe).clone()
        check = controller.method.rule.is_check_step(step)
        state_before = untouched_state(backend) if check else None
        snapshot = _factors(backend, controller) if capture and check and growth is None else None
        plan = controller.after_step(step, losses[-1])
        if snapshot is not None and plan is not None and plan.kind == "grow" and plan.capacities:
            growth = {"step": step, "ranks": dict(plan.ranks), "capacities": dict(plan.capacities),
                      "before": snapshot, "after": _factors(backend, controller)}
        if plan is not None:
            with torch.no_grad():
                unchanged.append(float((backend.model(probe) - before).abs().max()))
            if plan.kind == "grow":
                after = untouched_state(backend)
                bitwise.append(all(torch.equal(after[k], v) for k, v in state_before.items()))
            decisions.append((plan.step, plan.kind, dict(plan.ranks), dict(plan.capacities)))
    spectra = [e["gram_bytes"] for e in controller.events if e["event"] == "spectrum"]
    layers = {n: (type(m).__name__, getattr(m, "rank", None)) for n, m in backend.unwrapped_model().named_modules()
              if n in ("2", "4")}
    return {"losses": losses, "unchanged": unchanged, "decisions": decisions, "gram_bytes": spectra,
            "layers": layers, "untouched_bitwise": bitwise, "growth": growth}


def config(fold: bool):
    """The InRank test config; fold=True adds efficient InRank (fix at step 20, fold into U·V)."""
    from dist_lowrank.config import config_from_dict


    data = {**INRANK, "inrank": {**INRANK["inrank"], **({"fix_after": 20, "fold_on_fix": True} if fold else {})}}
    return config_from_dict(data)


def ddp_inrank_worker(rank: int, world: int, fold: bool = False):
    from dist_lowrank.backends.ddp_backend import DDPBackend
    from dist_lowrank.controller import LowRankController
    from dist_lowrank.methods.inrank.model import to_inrank
    from examples.common import mlp

    cfg = config(fold)
    backend = DDPBackend(to_inrank(mlp(), cfg), lambda p: torch.optim.AdamW(p, lr=3e-3))
    controller = LowRankController(backend, cfg)
    controller.start()
    return run_inrank(backend, controller, rank, world, batch=32, capture=not fold)


def reference_inrank(fold: bool = False) -> dict:
    from dist_lowrank.backends.local_backend import LocalBackend
    from dist_lowrank.controller import LowRankController
    from dist_lowrank.methods.inrank.model import to_inrank
    from examples.common import mlp

    cfg = config(fold)
    backend = LocalBackend(to_inrank(mlp(), cfg), lambda p: torch.optim.AdamW(p, lr=3e-3))
    controller = LowRankController(backend, cfg)
    controller.start()
    return run_inrank(backend, controller, 0, 1, batch=64)


def fsdp2_inrank_worker(rank: int, world: int, fold: bool = False):
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from dist_lowrank.backends.fsdp2_backend import FSDP2Backend
    from dist_lowrank.controller import LowRankController
    from dist_lowrank.methods.inrank.model import to_inrank
    from dist_lowrank.methods.inrank.layer import InRankLinear
    from examples.common import mlp

    cfg = config(fold)

    def shard(model):
        for module in model:
            if isinstance(module, (nn.Linear, InRankLinear)):
                fully_shard(module)
        return fully_shard(model)

    backend = FSDP2Backend(lambda: to_inrank(mlp(), cfg), shard, lambda p: torch.optim.AdamW(p, lr=3e-3))
    controller = LowRankController(backend, cfg)
    controller.start()
    return run_inrank(backend, controller, rank, world, batch=32)


def deepspeed_inrank_worker(rank: int, world: int, stage: int, fold: bool = False):
    from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend
    from dist_lowrank.controller import LowRankController
    from dist_lowrank.methods.inrank.model import to_inrank
    from examples.common import mlp

    cfg = config(fold)
    ds_config = {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "steps_per_print": 10**9}
    backend = DeepSpeedBackend(to_inrank(mlp(), cfg), ds_config, lambda p: torch.optim.AdamW(p, lr=3e-3))
    controller = LowRankController(backend, cfg)
    controller.start()
    return run_inrank(backend, controller, rank, world, batch=32)
