"""Workers for tests/distributed/test_param_groups.py (module level for the spawn harness): run
examples/param_groups_accumulation.py and read back what the engine really holds."""
from __future__ import annotations

from typing import Any

import torch

WATCHED = ("0.weight", "6.bias")  # parameters no switch touches: their Adam state is compared


def _hyper(group: dict) -> tuple:
    return (float(group["lr"]), float(group["weight_decay"]), tuple(group["betas"]), group.get("tag"))


def _full(value: torch.Tensor) -> torch.Tensor:
    return (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()


def read_optimizer(obj: Any) -> dict:
    """What the engine really holds: per parameter name its group's (lr, weight_decay, betas, tag), the
    Adam step of the parameter (DeepSpeed: of its flat group), the watched parameters' full exp_avg_sq, the
    scheduler the engine steps and the number of groups. `obj`: a DeepSpeed proxy or backend, or a torch
    backend."""
    out: dict[str, Any] = {}
    if hasattr(obj, "engine"):  # DeepSpeed (the proxy of deepspeed_api, or a DeepSpeedBackend)
        from deepspeed.utils import safe_get_full_optimizer_state

        engine = obj.engine
        module, zero = engine.module, engine.optimizer
        base = getattr(zero, "optimizer", zero)
        names = {id(p): n for n, p in module.named_parameters()}
        if hasattr(zero, "fp16_groups") and hasattr(zero, "sub_group_to_group_id"):  # ZeRO-3
            members = [(zero.sub_group_to_group_id[i], g) for i, g in enumerate(zero.fp16_groups)]
            flats = {i: zero.fp32_partitioned_groups_flat[s] for s, i in zero.sub_group_to_group_id.items()}
        else:
            members = list(enumerate(zero.bit16_groups))
            flats = {i: g["params"][0] for i, g in enumerate(base.param_groups)}
        out["groups"] = {names[id(p)]: _hyper(base.param_groups[i]) for i, params in members for p in params}
        out["steps"] = {names[id(p)]: float(base.state[flats[i]]["step"]) for i, params in members for p in params}
        params = dict(module.named_parameters())
        out["state"] = {n: safe_get_full_optimizer_state(params[n], "exp_avg_sq").clone() for n in WATCHED}
        out["scheduler"] = engine.lr_scheduler
        out["n_groups"] = len(base.param_groups)
    else:
        module = obj.unwrapped_model()
        names = {id(p): n for n, p in module.named_parameters()}
        opt = obj.optimizer
        out["groups"] = {names[id(p)]: _hyper(g) for g in opt.param_groups for p in g["params"]}
        out["steps"] = {names[id(p)]: float(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"]
                        if opt.state.get(p)}
        params = dict(module.named_parameters())
        out["state"] = {n: _full(opt.state[params[n]]["exp_avg_sq"]) for n in WATCHED}
        out["scheduler"] = obj.scheduler if obj.scheduler is not None and obj.scheduler.optimizer is opt else None
        out["n_groups"] = len(opt.param_groups)
    return out


def inspect(handle: Any, scheduler: Any) -> dict:
    """read_optimizer, with the scheduler replaced by: is it the user's instance, and its position."""
    out = read_optimizer(handle)
    out["same_scheduler"] = out.pop("scheduler") is scheduler
    out["last_epoch"] = scheduler.last_epoch
    return out


def _train(backend: Any, batches, steps: int, accum: int) -> list[float]:
    """`steps` optimizer steps of `accum` micro-batches each (DeepSpeed accumulates by itself)."""
    import torch.nn.functional as F

    losses = []
    for _ in range(steps):
        x, y = next(batches)
        micro = []
        for xm, ym in zip(x.chunk(accum), y.chunk(accum)):
            loss = F.cross_entropy(backend.model(xm), ym)
            backend.backward(loss)
            backend.step()
            micro.append(float(loss.detach()))
        losses.append(sum(micro) / len(micro))
    return losses


def resume_check(handle: Any, directory: str, rank: int, world: int) -> dict:
    """Save the switched engine (DeepSpeed: companion groups; FSDP2: DCP shards) with its scheduler, build a
    new one the way a resumed user script does (the model given the saved layout, the user's own optimizer and
    scheduler code, the manifest's group layout), load, then train both 2 more steps on the same batches."""
    import json

    from dist_lowrank.checkpoint.manifest import apply_layout, layout_of
    from examples.common import digits, mlp
    from examples.param_groups_accumulation import ACCUM, MICRO, ds_config, optimizer_and_scheduler, shard

    backend = getattr(handle, "_backend", handle)  # the DeepSpeed proxy's backend, or the FSDP2 backend
    meta = json.loads(json.dumps(backend.engine_meta()))  # exactly what the manifest keeps
    layout = layout_of(backend.unwrapped_model())
    backend.save_state(directory, "{}")
    if backend.name == "deepspeed":
        from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend

        fresh = apply_layout(mlp(), layout)
        optimizer, scheduler = optimizer_and_scheduler(fresh)
        resumed = DeepSpeedBackend(fresh, ds_config(backend.stage), optimizer, scheduler,
                                   param_groups=meta["param_groups"])
        accum = ACCUM
    else:
        from dist_lowrank.backends.fsdp2_backend import FSDP2Backend

        model_fn = lambda: apply_layout(mlp(), layout)  # noqa: E731 - the resumed script's model function
        fresh = shard(model_fn())
        optimizer, scheduler = optimizer_and_scheduler(fresh)
        resumed = FSDP2Backend(model_fn, shard, optimizer, scheduler, model=fresh, param_groups=meta["param_groups"])
        accum = 1  # the FSDP2 loop's accumulation is tested above; here the same 32-sample steps on both
    resumed.load_state(directory, meta)
    original, loaded = read_optimizer(backend), read_optimizer(resumed)
    out = {"groups": (original["groups"], loaded["groups"]), "steps": (original["steps"], loaded["steps"]),
           "last_epoch": (original["scheduler"].last_epoch, scheduler.last_epoch),
           "same_scheduler": loaded["scheduler"] is scheduler, "n_groups": loaded["n_groups"]}
    losses = []
    for engine in (backend, resumed):
        losses.append(_train(engine, digits(rank, world, batch=ACCUM * MICRO, seed=5), 2, accum))
    out["losses"] = tuple(losses)
    return out


def growth_check(kind: str, rank: int, world: int) -> dict:
    """InRank growth past capacity at step 10 (tests/distributed/inrank_workers.py's config) with the two
    groups and the LambdaLR instance: groups, schedule, U/V steps and untouched state after it."""
    from dist_lowrank.controller import LowRankController
    from dist_lowrank.methods.inrank.model import to_inrank
    from examples.common import digits, mlp
    from examples.param_groups_accumulation import ds_config, optimizer_and_scheduler
    from tests.distributed.inrank_workers import config

    cfg = config(False)
    model = to_inrank(mlp(), cfg)
    optimizer, scheduler = optimizer_and_scheduler(model)
    if kind == "ddp":
        from dist_lowrank.backends.ddp_backend import DDPBackend

        backend = DDPBackend(model, optimizer, scheduler)
    else:
        from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend

        backend = DeepSpeedBackend(model, ds_config(int(kind[-1]), micro=32, accum=1), optimizer, scheduler)
    controller = LowRankController(backend, cfg)
    controller.start()
    batches = digits(rank, world, batch=32)
    for step in range(1, 11):
        loss = _train(backend, batches, 1, 1)[0]
        before = read_optimizer(backend)["state"] if step == 10 else None
        plan = controller.after_step(step, loss)
    after = read_optimizer(backend)
    return {"plan": (plan.kind, dict(plan.ranks), dict(plan.capacities)), "groups": after["groups"],
            "steps": after["steps"], "same_scheduler": after["scheduler"] is scheduler,
            "last_epoch": scheduler.last_epoch, "n_groups": after["n_groups"],
            "untouched_bitwise": all(torch.equal(before[n], after["state"][n]) for n in WATCHED)}


def example_worker(rank: int, world: int, backend: str, steps: int, resume_dir: str = "", growth: bool = False):
    """The example on this rank; then, in the same processes (no second start-up), optionally a resume of
    its switched engine (DeepSpeed) and an InRank growth on the same kind of engine."""
    from examples.param_groups_accumulation import main

    checks: dict[str, Any] = {}

    def inspect_and_more(handle, scheduler):
        out = inspect(handle, scheduler)
        if resume_dir:
            checks["resume"] = resume_check(handle, resume_dir, rank, world)
        return out

    result = main(backend, steps, inspect=inspect_and_more)
    if growth:
        checks["growth"] = growth_check(backend, rank, world)
    return {**result, **checks}
