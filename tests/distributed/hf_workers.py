"""Hugging Face models on real ranks (module level for the spawn harness), and the plain-torch references.

Each worker runs a README example and records, on every rank: the plan, the tie of the head to the
embedding after the switch and at the end, the model's output on fixed held-out windows right after the
switch, and the dense fp32 weights the switch factorized (the backend's own `export_fp32`, taken by a spy
around `apply` just before the reshard; the spy only observes). The references below use transformers
and plain torch only (torch.linalg.svd, torch.optim.AdamW): nothing of the plugin.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


def _spy_on_apply(backend_cls: type, seen: dict) -> None:
    """Record the dense fp32 state dict (rank 0) when a switch starts, then run the real apply."""
    real = backend_cls.apply

    def apply(self, change):
        if change.kind == "switch" and "dense" not in seen:
            seen["dense"] = self.export_fp32()
        seen["pending"] = change.kind
        return real(self, change)

    backend_cls.apply = apply
    return lambda: setattr(backend_cls, "apply", real)


def _first_block(model: nn.Module) -> nn.Module:
    """The first transformer block itself (inside checkpoint_wrapper, if any)."""
    names = ("GPT2Block", "LlamaDecoderLayer")  # fully_shard subclasses it (FSDPLlamaDecoderLayer)
    return next(m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__))


def _tied(model: nn.Module) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _observer(seen: dict, unwrapped, output):
    """on_step callback: after every reshard, the output on the held-out windows (and at the switch the tie)."""
    from dist_lowrank.device import default_device
    from examples.hf_common import eval_batch, logits

    seen["after_reshard"] = []

    def on_step(step: int, holder: Any) -> None:
        if step == 1:  # count the first block's norm calls during step 2 (2 = the block recomputed in backward)
            block = _first_block(unwrapped(holder))
            seen["block_calls"], norm = [], getattr(block, "input_layernorm", None) or block.ln_1  # Llama / GPT-2
            seen["hook"] = norm.register_forward_pre_hook(lambda *_: seen["block_calls"].append(1))
        elif step == 2:
            seen.pop("hook").remove()
            seen["block_calls"] = len(seen["block_calls"])
        kind = seen.pop("pending", None)
        if kind is not None:
            out = logits(output(holder), eval_batch(device=default_device()))
            seen["after_reshard"].append((kind, step, out))
            if kind == "switch" and "switch_logits" not in seen:
                seen["switch_logits"], seen["tied_after_switch"] = out, _tied(unwrapped(holder))
        seen["tied_end"] = _tied(unwrapped(holder))

    return on_step


def deepspeed_run(rank: int, world: int, model: str, stage: int, out_dir: Optional[str], lowrank: dict,
                  steps: int, plain_steps: int = 0, checkpointing: bool = False) -> dict:
    """Optionally `plain_steps` of the same job under plain `deepspeed.initialize` (no plugin: the reference
    before the switch), then examples/hf_deepspeed.py with the plugin."""
    import deepspeed

    from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend
    from examples import hf_deepspeed
    from examples.hf_common import batches, lm_loss

    plain = []
    if plain_steps:
        net = hf_deepspeed.build(model, checkpointing)
        engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=3e-3),
                                          config=hf_deepspeed.ds_config(stage, None))
        from dist_lowrank.device import default_device

        data = batches(rank, world, device=default_device())
        for _ in range(plain_steps):
            loss = lm_loss(engine, next(data))
            engine.backward(loss)
            engine.step()
            plain.append(float(loss.detach()))
        engine.destroy()
        del engine, net
    seen: dict = {}
    restore = _spy_on_apply(DeepSpeedBackend, seen)
    on_step = _observer(seen, lambda engine: engine.module, lambda engine: engine)
    try:
        result = hf_deepspeed.main(model, stage, steps, lowrank=lowrank, out_dir=out_dir,
                                   checkpointing=checkpointing, on_step=on_step)
    finally:
        restore()
    return {**result, **seen, "plain_losses": plain}


def fsdp2_run(rank: int, world: int, model: str, out_dir: Optional[str], lowrank: dict, steps: int,
              checkpointing: bool = False) -> dict:
    from dist_lowrank.backends.fsdp2_backend import FSDP2Backend
    from examples import hf_fsdp2

    seen: dict = {}
    restore = _spy_on_apply(FSDP2Backend, seen)
    on_step = _observer(seen, lambda backend: backend.unwrapped_model(), lambda backend: backend.model)
    names: list = []

    def record_names(step, backend):
        on_step(step, backend)
        if not names:
            names.extend(n for n, _ in backend.model.named_parameters())

    try:
        result = hf_fsdp2.main(model, steps, lowrank=lowrank, out_dir=out_dir, checkpointing=checkpointing,
                               on_step=record_names)
    finally:
        restore()
    return {**result, **seen, "param_names": names}


def ddp_run(rank: int, world: int, model: str, lowrank: dict, steps: int, blocker: Optional[str] = None) -> dict:
    """The same job under DDPBackend (the loop of examples/ddp_cuttlefish.py). Then, with `blocker` (a path
    that is a file on rank 0, the only writer), a save that must fail on every rank with one named error."""
    import torch.distributed as dist

    from dist_lowrank import attach
    from dist_lowrank.backends.ddp_backend import DDPBackend
    from examples.hf_common import batches, gpt2, llama, lm_loss

    seen: dict = {}
    restore = _spy_on_apply(DDPBackend, seen)
    on_step = _observer(seen, lambda backend: backend.unwrapped_model(), lambda backend: backend.model)
    backend = DDPBackend({"gpt2": gpt2, "llama": llama}[model](), lambda p: torch.optim.AdamW(p, lr=3e-3))
    controller = attach(backend, lowrank)
    from dist_lowrank.device import default_device

    data, losses = batches(dist.get_rank(), dist.get_world_size(), device=default_device()), []
    for step in range(1, steps + 1):
        loss = lm_loss(backend.model, next(data))
        backend.backward(loss)
        backend.step()
        controller.after_step(step, float(loss.detach()))
        losses.append(float(loss.detach()))
        on_step(step, backend)
    restore()
    switch = [e for e in controller.events if e["event"] == "switch"]
    embedding = backend.unwrapped_model().get_input_embeddings().weight.detach().float().cpu().clone()
    save_error = None
    if blocker is not None:
        from dist_lowrank import save_lowrank

        try:
            save_lowrank(backend, blocker)
        except Exception as exc:  # noqa: BLE001 - the test reads what each rank raised
            save_error = f"{type(exc).__name__}: {exc}"
    return {"losses": losses, "switch_step": switch[0]["step"] if switch else None,
            "ranks": switch[0]["ranks"] if switch else {}, "embedding_end": embedding, "save_error": save_error,
            **seen}


# ---- references: transformers + plain torch only ------------------------------------------------------
def load_dense(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """The run's dense weights into a fresh model; a key the export left out must be a tied alias."""
    own = model.state_dict(keep_vars=True)
    present = {k: v for k, v in state.items() if k in own}
    missing = set(own) - set(present)
    aliases = {id(t): k for k, t in own.items() if k in present}
    assert all(id(own[k]) in aliases for k in missing), f"export misses untied tensors: {sorted(missing)[:3]}"
    model.load_state_dict({**present, **{k: state[aliases[id(own[k])]] for k in missing}})
    return model


class TwoLinear(nn.Module):
    """y = x Bᵀ Aᵀ + bias: the factorized layer written in plain torch for the reference."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(a), nn.Parameter(b)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.b.T @ self.a.T
        return y if self.bias is None else y + self.bias


def factorize_in_torch(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace each named layer by its truncated SVD (A = U√Σ, B = √ΣVᵀ, in float64) — the documented split.
    HF Conv1D stores its weight (in, out), so W = weight.T."""
    for name, rank in ranks.items():
        layer = model.get_submodule(name)
        conv1d = type(layer).__name__ == "Conv1D"
        w = (layer.weight.T if conv1d else layer.weight).detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        a, b = (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, TwoLinear(a, b, layer.bias))
    return model


def reference_switch_logits(model: str, dense: dict, ranks: dict[str, int]) -> torch.Tensor:
    from examples.hf_common import eval_batch, gpt2, llama, logits

    net = load_dense({"gpt2": gpt2, "llama": llama}[model](), dense)
    return logits(factorize_in_torch(net, ranks).eval(), eval_batch())


def plain_torch_losses(model: str, steps: int, world: int = 2, checkpointing: bool = False) -> list[float]:
    """One process, the global batch, plain AdamW: what FSDP2/DDP must reproduce before the switch."""
    from examples.hf_common import BATCH, batches, gpt2, llama, lm_loss

    net = {"gpt2": gpt2, "llama": llama}[model]()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    data, losses = batches(0, 1, batch=BATCH * world), []
    for _ in range(steps):
        loss = lm_loss(net, next(data))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


# ---- activation checkpointing: the same job with and without it, in one process per rank ---------------
def _strip(result: dict, keep_dense: bool) -> dict:
    return {k: v for k, v in result.items() if k != "dense" or keep_dense}


def checkpointing_pairs_fsdp2(rank: int, world: int, lowranks: dict[str, dict], steps: int,
                              out_dir: Optional[str] = None) -> dict:
    """For each named `lowrank` section (a switch, an InRank growth): Llama under FSDP2, once with torch's
    checkpoint_wrapper applied in the sharding function and once without. The first checkpointed job is
    saved to `out_dir` and loaded back into the unwrapped model."""
    out = {}
    for index, (label, lowrank) in enumerate(lowranks.items()):
        for checkpointing in (True, False):
            save = out_dir if index == 0 and checkpointing else None
            out[label, checkpointing] = _strip(fsdp2_run(rank, world, "llama", save, lowrank, steps, checkpointing),
                                               keep_dense=not checkpointing)
    return out


def checkpointing_pairs_deepspeed(rank: int, world: int, stage: int, lowranks: dict[str, dict], steps: int) -> dict:
    """The same under DeepSpeed, with HF's gradient checkpointing (torch.utils.checkpoint inside the model)."""
    out = {}
    for label, lowrank in lowranks.items():
        for checkpointing in (True, False):
            out[label, checkpointing] = _strip(deepspeed_run(rank, world, "llama", stage, None, lowrank, steps,
                                                             checkpointing=checkpointing), keep_dense=not checkpointing)
    return out


def users_deepspeed_engine(net: nn.Module, lowrank: dict, lr_factor, accumulation: int):
    """The user's own set-up around an HF model (what the user-script tests share): AdamW with two param groups
    (decay on matrices only), a LambdaLR, then the one changed call `dist_lowrank.deepspeed_api.initialize` with
    bf16, ZeRO-2 and gradient accumulation."""
    import dist_lowrank.deepspeed_api as lowrank_ds

    decay = [p for p in net.parameters() if p.dim() >= 2]
    rest = [p for p in net.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": accumulation,
              "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
              "lowrank": lowrank}
    engine, _, _, _ = lowrank_ds.initialize(model=net, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine

