"""A Hugging Face model (built from a config: GPT-2 or Llama) under DeepSpeed ZeRO with Cuttlefish and the
default targets; the tied lm_head is skipped by the plugin. Then the switched model is saved and loaded back
for inference, its layout travelling with the weights.

    deepspeed --num_gpus 2 examples/hf_deepspeed.py --model gpt2 --stage 3 --out runs/hf-gpt2   (DS_ACCELERATOR=cpu on CPU)
    deepspeed --num_gpus 2 examples/hf_deepspeed.py --model llama --checkpointing    (torch.utils.checkpoint in the model)
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import argparse
from typing import Callable, Optional

import torch

import dist_lowrank
from dist_lowrank.device import default_device
import dist_lowrank.deepspeed_api as lowrank_ds
from examples.hf_common import BATCH, batches, eval_batch, gpt2, llama, lm_loss, logits, lowrank_section

MODELS = {"gpt2": gpt2, "llama": llama}


def ds_config(stage: int, lowrank: Optional[dict]) -> dict:
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "steps_per_print": 10**9}
    if lowrank is not None:
        config["lowrank"] = lowrank
    return config


def build(model: str, checkpointing: bool = False, lowrank: Optional[dict] = None) -> torch.nn.Module:
    """The user's model; with `checkpointing`, HF's own gradient checkpointing (torch.utils.checkpoint inside
    every block); InRank needs the model converted before the engine is built."""
    net = MODELS[model]()
    if checkpointing:
        net.config.use_cache = False
        net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if lowrank is not None:  # the method's own layers (InRank: W0 + U Vᵀ), before the engine is built
        import dist_lowrank

        net = dist_lowrank.prepare_model(net, lowrank)
    return net


def main(model: str = "gpt2", stage: int = 2, steps: int = 20, lowrank: Optional[dict] = None,
         out_dir: Optional[str] = None, checkpointing: bool = False,
         on_step: Optional[Callable[[int, object], None]] = None) -> dict:
    import torch.distributed as dist

    lowrank = lowrank or lowrank_section()
    net = build(model, checkpointing, lowrank)
    # The one changed call (was: deepspeed.initialize):
    engine, _, _, _ = lowrank_ds.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=3e-3),
                                            config=ds_config(stage, lowrank))
    rank, world = dist.get_rank(), dist.get_world_size()
    data, losses = batches(rank, world, device=default_device()), []  # batches on the model's device
    for step in range(1, steps + 1):
        loss = lm_loss(engine, next(data))     # unchanged loop
        engine.backward(loss)
        engine.step()                          # the switch happens in here
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, engine)
    events = engine.controller.events if engine.controller else []
    switch = [e for e in events if e["event"] in ("switch", "grow")]
    result = {"losses": losses, "switch_step": switch[0]["step"] if switch else None,
              "ranks": switch[0]["ranks"] if switch else {}, "events": [(e["event"], e["step"]) for e in switch]}
    if out_dir is not None:
        dist_lowrank.save_lowrank(engine, out_dir)        # collective; rank 0 writes
        live = logits(engine, eval_batch(device=default_device()))  # collective under ZeRO-3
        dist.barrier()
        if rank == 0:  # inference anywhere: no engine, no process group needed
            loaded = dist_lowrank.load_lowrank(lambda: build(model), out_dir)
            result.update(live_logits=live, loaded_logits=logits(loaded.eval(), eval_batch()))  # on the CPU
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="gpt2")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    result = main(args.model, args.stage, args.steps, out_dir=args.out, checkpointing=args.checkpointing)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"switched at step {result['switch_step']} to ranks {result['ranks']}; "
              f"loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}")
        if "loaded_logits" in result:
            diff = (result["loaded_logits"] - result["live_logits"]).abs().max()
            print(f"saved to {args.out}; loaded model's logits differ from the live model's by {diff:.2e}")
