"""A Hugging Face model (built from a config: Llama or GPT-2) under FSDP2 with Cuttlefish and the default
targets. The sharding function is the user's (torchtitan style): one `fully_shard` per block, optionally
activation checkpointing with torch's `checkpoint_wrapper` applied first. Then the switched model is saved
and loaded back for inference.

    torchrun --nproc_per_node 2 examples/hf_fsdp2.py --model llama --checkpointing --out runs/hf-llama
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import argparse
from functools import partial
from typing import Callable, Optional

import torch
from torch import nn

import dist_lowrank
from dist_lowrank.device import default_device
from dist_lowrank import attach
from dist_lowrank.backends.fsdp2_backend import FSDP2Backend
from examples.hf_common import batches, eval_batch, gpt2, llama, lm_loss, logits, lowrank_section

MODELS = {"gpt2": gpt2, "llama": llama}


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of an HF causal LM (GPT-2: `transformer.h`, Llama: `model.layers`)."""
    base = model.base_model
    return base.h if hasattr(base, "h") else base.layers


def shard(model: nn.Module, checkpointing: bool = False) -> nn.Module:
    """The user's sharding function: checkpoint_wrapper (optional), fully_shard per block, then the root
    (embedding, final norm and the tied head stay together in the root's group)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import fully_shard

    layers = blocks(model)
    for index, block in enumerate(layers):
        if checkpointing:
            block = checkpoint_wrapper(block)   # parameter names gain `_checkpoint_wrapped_module.`
            layers[index] = block
        fully_shard(block)
    return fully_shard(model)


def model_fn(model: str, lowrank: dict) -> nn.Module:
    net = MODELS[model]()
    if lowrank:  # the method's own layers (InRank: W0 + U Vᵀ), before the engine is built
        import dist_lowrank

        net = dist_lowrank.prepare_model(net, lowrank)
    return net


def main(model: str = "llama", steps: int = 20, lowrank: Optional[dict] = None, out_dir: Optional[str] = None,
         checkpointing: bool = False, on_step: Optional[Callable[[int, object], None]] = None) -> dict:
    import torch.distributed as dist

    lowrank = lowrank or lowrank_section()
    backend = FSDP2Backend(partial(model_fn, model, lowrank), partial(shard, checkpointing=checkpointing),
                           lambda params: torch.optim.AdamW(params, lr=3e-3))
    controller = attach(backend, lowrank)      # validates the config, measures srank at init
    rank, world = dist.get_rank(), dist.get_world_size()
    data, losses = batches(rank, world, device=default_device()), []  # batches on the model's device
    for step in range(1, steps + 1):
        loss = lm_loss(backend.model, next(data))   # always backend.model: it changes at a switch
        backend.backward(loss)
        backend.step()
        controller.after_step(step, float(loss.detach()))
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, backend)
    switch = [e for e in controller.events if e["event"] in ("switch", "grow")]
    result = {"losses": losses, "switch_step": switch[0]["step"] if switch else None,
              "ranks": switch[0]["ranks"] if switch else {}, "events": [(e["event"], e["step"]) for e in switch]}
    if out_dir is not None:
        dist_lowrank.save_lowrank(backend, out_dir)       # collective; rank 0 writes
        live = logits(backend.model, eval_batch(device=default_device()))
        dist.barrier()
        if rank == 0:  # inference anywhere: no sharding, no process group needed
            loaded = dist_lowrank.load_lowrank(partial(model_fn, model, lowrank), out_dir)
            result.update(live_logits=live, loaded_logits=logits(loaded.eval(), eval_batch()))  # on the CPU
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="llama")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()
    import torch.distributed as dist

    from dist_lowrank.device import before_process_group, default_dist_backend

    before_process_group()  # this rank's GPU bound, torch._dynamo imported: before the process group
    dist.init_process_group(default_dist_backend())
    result = main(args.model, args.steps, out_dir=args.out, checkpointing=args.checkpointing)
    if dist.get_rank() == 0:
        print(f"switched at step {result['switch_step']} to ranks {result['ranks']}; "
              f"loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}")
        if "loaded_logits" in result:
            diff = (result["loaded_logits"] - result["live_logits"]).abs().max()
            print(f"saved to {args.out}; loaded model's logits differ from the live model's by {diff:.2e}")
    from dist_lowrank.device import end_process_group

    end_process_group()  # engines freed while the group is up, then the group
