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
    # DeepSpeed clips gradients at 1.0 unless told otherwise (its default since 0.1x); the prior's term makes
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
