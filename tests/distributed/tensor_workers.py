"""Workers of the tensorized-layer tests (issue 17): the tests' MLP with its two hidden layers in a tensor format,
Adam, the real controller with the prior on and one prune at PRUNE_STEP (every rank group loses its smallest-λ
slot: threshold above every λ, min_rank = init_rank − 1), on one process or 2 ranks of any engine."""
from __future__ import annotations

import torch

from tests.distributed.switch_common import local_batch, loss_fn, make_model

TENSOR_LAYERS = ("net.2", "net.4")
STEPS, PRUNE_STEP, INIT_RANK = 5, 3, 4


def tensor_config(fmt: str):
    from dist_lowrank.config import LowRankConfig
    from dist_lowrank.config_io import dataclass_from_dict

    return dataclass_from_dict(LowRankConfig, {
        "strategy": "tensor", "target_modules": list(TENSOR_LAYERS),
        "tensor": {"format": fmt, "init_rank": INIT_RANK, "min_rank": INIT_RANK - 1, "kl_mult": 0.05,
                   "threshold": 1e9, "prune_every": PRUNE_STEP, "prune_after": PRUNE_STEP}}, "lowrank")


def tensor_model(fmt: str):
    from dist_lowrank import prepare_model

    return prepare_model(make_model(), tensor_config(fmt))


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def tensor_worker(rank: int, world: int, kind: str, fmt: str) -> dict:
    """Losses, λ after every step, the prune plan, every parameter's full value and Adam state right before and
    after the prune, and the final cores — read back with each engine's own API."""
    from dist_lowrank.controller import LowRankController
    from tests.distributed.shrink_workers import make_backend, read_full

    torch.manual_seed(0)
    # DeepSpeed clips gradients at norm 1.0 unless told otherwise (deepspeed 0.19.8 default); the prior's term makes
    # the gradient larger than that here, and the one-process reference does not clip
    backend = make_backend(kind, world, lambda: tensor_model(fmt), adam,
                           {"zero_allow_untested_optimizer": True, "gradient_clipping": 0.0})
    controller = LowRankController(backend, tensor_config(fmt))
    controller.start()
    method = controller.method
    losses, scales, plans, around, measured = [], [], [], {}, {}
    decide = method.decide

    def recording(step, measurement):  # the λ each prune decision saw (before the prune slices them)
        measured[step] = measurement
        return decide(step, measurement)

    method.decide = recording
    for step in range(1, STEPS + 1):
        loss = controller.regularize(loss_fn(backend.model, local_batch(step, rank, world)))
        backend.backward(loss)
        backend.step()
        if step == PRUNE_STEP:
            around["before"] = read_full(kind, backend)
            specs_before = {n: backend.unwrapped_model().get_submodule(n).spec for n in TENSOR_LAYERS}
        plan = controller.after_step(step, float(loss.detach()))
        if step == PRUNE_STEP:
            around["after"] = read_full(kind, backend)
        losses.append(float(loss.detach()))
        scales.append({n: [lam.tolist() for lam in groups] for n, groups in sorted(method.scales.items())})
        if plan is not None:
            plans.append((plan.step, plan.keep))
    final = read_full(kind, backend)
    specs = {n: backend.unwrapped_model().get_submodule(n).spec for n in TENSOR_LAYERS}
    return {"losses": losses, "scales": scales, "plans": plans, "around": around, "final": final, "specs": specs,
            "specs_before": specs_before, "measured": measured,
            "scale_bytes": method.scale_bytes,
            "events": [e for e in controller.events if e["event"] in ("rank_update", "prune")]}


HF_STEPS, HF_ACCUMULATION, HF_PRUNE = 6, 2, 4
HF_LOWRANK = {"strategy": "tensor", "target_modules": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
              "tensor": {"format": "ttm", "init_rank": 6, "min_rank": 5, "kl_mult": 1e-4, "threshold": 1e9,
                         "prune_every": HF_PRUNE, "prune_after": HF_PRUNE}}


def hf_lr_factor(step: int) -> float:
    return min(1.0, (step + 1) / 3)


def hf_tensor_worker(rank: int, world: int) -> dict:
    """The user's own script: transformers' Llama (its MLP's Linear layers tensorized by prepare_model), then the
    one changed call `dist_lowrank.deepspeed_api.initialize` with bf16, ZeRO-2, gradient accumulation, AdamW with
    two param groups and a LambdaLR scheduler; the loop is DeepSpeed's."""
    import dist_lowrank
    from dist_lowrank.device import default_device
    from dist_lowrank.methods.tensor.model import tensor_layers
    from examples.hf_common import batches, llama, lm_loss
    from tests.distributed.hf_workers import users_deepspeed_engine

    engine = users_deepspeed_engine(dist_lowrank.prepare_model(llama(), HF_LOWRANK), HF_LOWRANK, hf_lr_factor,
                                    HF_ACCUMULATION)
    data = batches(rank, world, batch=4, device=default_device())
    losses, taken, slots = [], [], []
    for micro in range(1, HF_STEPS * HF_ACCUMULATION + 1):
        loss = lm_loss(engine, next(data))
        armed = [m.penalty is not None for m in tensor_layers(engine.module).values()]
        engine.backward(loss)
        taken.append((armed, [m.penalty is None for m in tensor_layers(engine.module).values()]))
        engine.step()
        losses.append(float(loss.detach()))
        if micro % HF_ACCUMULATION == 0:
            slots.append({n: list(m.spec.ranks) for n, m in tensor_layers(engine.module).items()})
    layers = tensor_layers(engine.module)
    matrices = {n: m.weight_matrix().detach().float().cpu() for n, m in layers.items()}
    probe = next(batches(0, 1, batch=2, seed=5, device=default_device()))
    with torch.no_grad():
        logits = engine.module(input_ids=probe).logits.float().cpu()
    return {"losses": losses, "taken": taken, "slots": slots, "matrices": matrices, "probe": probe.cpu(),
            "logits": logits, "weight": engine.controller.method.weight,
            "dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
            "state": {n: p.detach().float().cpu() for n, p in engine.module.state_dict().items()}}
