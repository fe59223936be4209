"""The training recipe a nanoGPT user expects, as factories every backend binds: AdamW with nanoGPT's decay
groups, linear warm-up then cosine decay (a multiplier per group), global gradient-norm clipping."""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Iterable, Optional

import torch

from dist_lowrank.backends.base import Backend
from dist_lowrank.train.run_config import RunConfig


def lr_factor(run: RunConfig, it: int) -> float:
    """The schedule's multiplier of run.lr for optimizer step `it` (0-based; step s of the loop is it = s-1),
    nanoGPT's recipe: linear warm-up (it+1)/(warmup_steps+1), then constant 1 or a cosine from 1 at
    it = warmup_steps down to min_lr/lr at it = steps (so the last step is just above the floor).

    A multiplier (not an absolute lr) so that every param group, factor groups added at a switch included,
    follows the same curve from its own base lr."""
    warm = run.warmup_steps
    if it < warm:
        return (it + 1) / (warm + 1)
    if run.lr_schedule == "constant":
        return 1.0
    floor = run.min_lr / run.lr
    ratio = min(1.0, (it - warm) / max(1, run.steps - warm))
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1.0 - floor)


def scheduler_factory(run: RunConfig) -> Optional[Callable[[torch.optim.Optimizer], Any]]:
    """optimizer -> LambdaLR(lr_factor), or None for a constant lr without warm-up (old configs: no scheduler,
    so their checkpoints and steps are what they were). A factory, not an instance: every backend binds it to
    its first optimizer and re-binds the same instance (its step count, one lambda per group) at a rebuild."""
    if run.lr_schedule == "constant" and run.warmup_steps == 0:
        return None
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, run))


def _stored_shape(param: torch.Tensor) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # a ZeRO-3 partitioned parameter reports shape (0,)


def optimizer_factory(run: RunConfig) -> Callable[[Iterable[Any]], torch.optim.Optimizer]:
    """params -> AdamW(lr, betas, weight_decay). With weight_decay > 0, nanoGPT's two groups: decay for >=2-D
    parameters (matrices, embeddings; factors made at a switch join their layer's weight, so the decay group),
    none for biases and norms. Called again at a rebuild with the layout's group dicts, which it keeps as given."""
    def build(params: Iterable[Any]) -> torch.optim.Optimizer:
        params = list(params)
        kwargs = {"lr": run.lr, "betas": (run.beta1, run.beta2), "weight_decay": run.weight_decay}
        if run.weight_decay > 0 and params and not isinstance(params[0], dict):
            decay = [p for p in params if len(_stored_shape(p)) >= 2]
            plain = [p for p in params if len(_stored_shape(p)) < 2]
            groups = [{"params": decay}] if decay else []
            groups += [{"params": plain, "weight_decay": 0.0}] if plain else []
            return torch.optim.AdamW(groups, **kwargs)
        return torch.optim.AdamW(params, **kwargs)
    return build


def clip_gradients(backend: Backend, max_norm: float) -> Optional[torch.Tensor]:
    """Clip the global gradient norm of the model's parameters to max_norm (DDP: gradients are already
    averaged; FSDP2: the norm of the DTensor shards is reduced over ranks, torchtitan's way); returns the norm
    before clipping as a device tensor (no host sync per step), None when off. DeepSpeed clips inside
    engine.step (ds_config `gradient_clipping`), so nothing here."""
    if max_norm <= 0 or backend.name == "deepspeed":
        return None
    if hasattr(backend, "clip_grad_norm"):  # gradients sharded by owner (fairscale OSS): the backend's global norm
        return backend.clip_grad_norm(max_norm)
    params = [p for p in backend.unwrapped_model().parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # a DTensor (Partial over the shards): the global norm on every rank
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
