"""Workers of the DLRT parity tests: the tests' MLP with DLRT layers (lowrank.strategy dlrt, parallel integrator,
plain SGD) trained on every engine through the real controller; the weights are read back with each engine's own API."""
from __future__ import annotations

import torch

from tests.distributed.switch_common import local_batch, loss_fn, make_model

DLRT_LAYERS = ("net.2", "net.4")
STEPS, LR = 8, 0.2
PERTURBED_STEP = 3
SETTINGS = {"strategy": "dlrt", "target_modules": list(DLRT_LAYERS),
            "dlrt": {"theta": 0.45, "init_rank": 6, "min_rank": 2, "capacity_multiple": 1, "growth_factor": 1.5,
                     "shrink_below": 0.6, "shrink_patience": 2}}


SWITCH_STEP = 3
SWITCH = {"dlrt": {**SETTINGS["dlrt"], "start": "switch"}, "monitor": {"cadence_steps": 1},
          "cuttlefish": {"min_switch_step": 0, "max_switch_step": SWITCH_STEP, "rank_rule": "raw"},
          "switch": {"profile_layers": False}}


def dlrt_config(switch: bool = False):
    from dist_lowrank.config import LowRankConfig
    from dist_lowrank.config_io import dataclass_from_dict

    return dataclass_from_dict(LowRankConfig, {**SETTINGS, **(SWITCH if switch else {})}, "lowrank")


def dlrt_model(switch: bool = False):
    from dist_lowrank import prepare_model

    return prepare_model(make_model(), dlrt_config(switch))


def sgd(params):
    return torch.optim.SGD(params, lr=LR)


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def make_backend(kind: str, world: int, switch: bool = False, optimizer=sgd):
    from tests.distributed.shrink_workers import make_backend as engine

    return engine(kind, world, lambda: dlrt_model(switch), optimizer,
                  {"zero_allow_untested_optimizer": True})  # torch SGD / Adam as the client


def full_value(kind: str, param: torch.Tensor) -> torch.Tensor:
    if kind.startswith("zero"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().clone().cpu()
    return (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().clone().cpu()


def moments_of(kind: str, backend) -> dict[str, dict[str, torch.Tensor]]:
    """Adam's exp_avg / exp_avg_sq of every K, L, S at the active rank, through the engine's own API."""
    out = {}
    for name in DLRT_LAYERS:
        layer = backend.unwrapped_model().get_submodule(name)
        r = layer.rank
        for leaf in "kls":
            param = getattr(layer, leaf)
            if kind.startswith("zero"):
                from deepspeed.utils import safe_get_full_optimizer_state

                state = {k: safe_get_full_optimizer_state(param, k) for k in ("exp_avg", "exp_avg_sq")}
            else:
                full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731 - FSDP2 DTensors
                state = {k: full(backend.optimizer.state[param][k]) for k in ("exp_avg", "exp_avg_sq")}
            out[f"{name}.{leaf}"] = {k: (v[:r, :r] if leaf == "s" else v[:, :r]).detach().cpu().clone()
                                     for k, v in state.items()}
    return out


def dlrt_worker(rank: int, world: int, kind: str, perturb: bool = False, switch: bool = False,
                optimizer: str = "sgd") -> dict:
    """`perturb`: rank 1 adds 1e-7·N(0, 1) to its replica of every factor after step PERTURBED_STEP's optimizer
    step (DDP: the replicas then differ, as they may in the last bits on real hardware). `switch`: start=switch
    (dense until Cuttlefish's detector, forced at SWITCH_STEP)."""
    from dist_lowrank.controller import LowRankController

    torch.manual_seed(0)
    backend = make_backend(kind, world, switch, {"sgd": sgd, "adam": adam}[optimizer])
    controller = LowRankController(backend, dlrt_config(switch))
    controller.start()
    trajectory, resizes, bytes_logged, capacities = [], [], [], [dict(controller.capacities)]
    for step in range(1, STEPS + 1):
        loss = loss_fn(backend.model, local_batch(step, rank, world))
        backend.backward(loss)
        backend.step()
        if perturb and rank == 1 and step == PERTURBED_STEP:  # this replica's factors differ from rank 0's
            with torch.no_grad():
                for name in DLRT_LAYERS:
                    for leaf in "uvskl":
                        param = getattr(backend.unwrapped_model().get_submodule(name), leaf)
                        param.add_(1e-7 * torch.randn_like(param))
        plan = controller.after_step(step, float(loss.detach()))
        trajectory.append(dict(controller.ranks))
        bytes_logged.append(controller.method.integrator_bytes)
        capacities.append(dict(controller.capacities))
        if plan is not None:
            resizes.append((step, dict(plan.capacities)))
    modules = backend.unwrapped_model()
    weights = {}
    for name in DLRT_LAYERS:
        layer = modules.get_submodule(name)
        r = layer.rank
        u, s, v = (full_value(kind, getattr(layer, leaf)) for leaf in ("u", "s", "v"))
        weights[name] = u[:, :r] @ s[:r, :r] @ v[:, :r].T
    others = {n: full_value(kind, p) for n, p in modules.named_parameters() if n.rsplit(".", 1)[-1] not in "usvkl"}
    logged = [e for e in controller.events if e["event"] == "rank_update"]
    switched = next(((e["step"], e["ranks"]) for e in controller.events if e["event"] == "switch"), None)
    return {"trajectory": trajectory, "resizes": resizes, "weights": weights, "others": others,
            "capacities": dict(controller.capacities), "integrator_bytes": bytes_logged, "logged": logged,
            "capacity_trajectory": capacities, "switch": switched,
            "moments": moments_of(kind, backend) if optimizer == "adam" else None,
            "dims": {n: (modules.get_submodule(n).out_features, modules.get_submodule(n).in_features)
                     for n in DLRT_LAYERS}}



HF_STEPS, HF_ACCUMULATION, HF_WARMUP = 12, 2, 3
HF_LOWRANK = {"strategy": "dlrt", "dlrt": {"theta": 0.3, "init_rank": 8, "capacity_multiple": 1}}


def hf_lr_factor(step: int) -> float:
    """The user's LambdaLR: linear warm-up over HF_WARMUP optimizer steps, then constant."""
    return min(1.0, (step + 1) / HF_WARMUP)


def hf_dlrt_worker(rank: int, world: int) -> dict:
    """The user's own script: transformers' GPT-2 (Conv1D layers) converted by prepare_model, then the one changed
    call `dist_lowrank.deepspeed_api.initialize` with bf16, ZeRO-2, gradient accumulation, AdamW with two param
    groups (decay on matrices only) and a LambdaLR scheduler; the loop is DeepSpeed's."""
    import dist_lowrank
    from dist_lowrank.device import default_device
    from dist_lowrank.methods.dlrt.model import dlrt_layers
    from examples.hf_common import batches, gpt2, lm_loss
    from tests.distributed.hf_workers import users_deepspeed_engine

    engine = users_deepspeed_engine(dist_lowrank.prepare_model(gpt2(), HF_LOWRANK), HF_LOWRANK, hf_lr_factor,
                                    HF_ACCUMULATION)
    data = batches(rank, world, batch=4, device=default_device())
    losses, trajectory, lrs = [], [], []
    for micro in range(1, HF_STEPS * HF_ACCUMULATION + 1):
        loss = lm_loss(engine, next(data))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        if micro % HF_ACCUMULATION == 0:  # an optimizer step (and the controller's) just ran
            trajectory.append(dict(engine.controller.ranks) if engine.controller else {})
            lrs.append([g["lr"] for g in engine.optimizer.param_groups])
    layers = dlrt_layers(engine.module)
    factors = {n: {leaf: getattr(m, leaf).detach().float().clone()[:, : m.rank] if leaf != "s" else
                   getattr(m, leaf).detach().float().clone()[: m.rank, : m.rank] for leaf in ("u", "s", "v")}
               for n, m in layers.items()}
    dtypes = sorted({str(p.dtype) for p in engine.module.parameters()})
    probe = next(batches(0, 1, batch=2, seed=5, device=default_device()))
    with torch.no_grad():
        logits = engine.module(input_ids=probe).logits.float().cpu()
    return {"losses": losses, "trajectory": trajectory, "lrs": lrs, "factors": factors, "dtypes": dtypes,
            "probe": probe.cpu(), "logits": logits, "state": {n: p.detach().float().cpu() for n, p in
                                                              engine.module.state_dict().items()}}
