"""A user's own Hugging Face Trainer script with low-rank training: the ds_config gains a "lowrank" section and
`Trainer` becomes `LowRankTrainer`; the switch happens inside `trainer.train()`, checkpoints carry the layout.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 examples/hf_trainer.py --out runs/hf-trainer
    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 examples/hf_trainer.py --out runs/hf-trainer --resume
    deepspeed --num_gpus 2 examples/hf_trainer.py --out runs/hf-trainer          (GPUs; any launcher works)

TensorBoard: `tensorboard --logdir runs/hf-trainer/runs` (the Trainer's own loss and learning-rate scalars).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import argparse
import json
from typing import Any, Optional, Union

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DS_CONFIG = os.path.join(HERE, "hf_trainer_ds_config.json")
SEQ, WINDOWS, MICRO = 32, 128, 4


class Windows(torch.utils.data.Dataset):
    """Fixed SEQ-token windows of the Shakespeare training plays; labels = inputs (GPT-2 shifts them itself)."""

    def __init__(self, n: int = WINDOWS, seed: int = 0) -> None:
        from examples.hf_common import _corpus

        tokens = _corpus()[0]
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(tokens) - SEQ, (n,), generator=gen).tolist()
        self.rows = [tokens[s:s + SEQ].clone() for s in starts]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def training_args(out: str, steps: int, deepspeed: Union[str, dict], save_steps: int, report_to: list[str]):
    """The user's TrainingArguments (nothing plugin-specific but `use_configured_state`, see below)."""
    from transformers import TrainingArguments

    from dist_lowrank.integrations.hf_trainer import configure_accelerate_for_deepspeed

    # CPU hosts only need this: accelerate 1.16 would count one DeepSpeed process there (harmless on GPUs)
    configure_accelerate_for_deepspeed()
    return TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=MICRO, learning_rate=3e-3,
                             logging_steps=1, save_strategy="steps", save_steps=save_steps, seed=0,
                             report_to=report_to, deepspeed=deepspeed, disable_tqdm=True, dataloader_num_workers=0,
                             max_grad_norm=1.0, accelerator_config={"use_configured_state": True})


def main(out: str, steps: int = 12, save_steps: int = 8, resume: bool = False,
         deepspeed: Union[str, dict] = DS_CONFIG) -> dict[str, Any]:
    from examples.hf_common import gpt2
    from transformers import TrainerCallback

    from dist_lowrank.integrations.hf_trainer import LowRankTrainer

    losses: dict[int, float] = {}

    class KeepLosses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses[int(state.global_step)] = float(logs["loss"])

    args = training_args(out, steps, deepspeed, save_steps, ["tensorboard"])
    trainer = LowRankTrainer(model=gpt2(seed=0), args=args, train_dataset=Windows(), callbacks=[KeepLosses()])
    trainer.train(resume_from_checkpoint=True if resume else None)
    controller = trainer.lowrank_controller
    switch = [e for e in controller.events if e["event"] == "switch"] if controller else []
    return {"losses": losses, "switch_step": switch[0]["step"] if switch else None,
            "ranks": switch[0]["ranks"] if switch else {},
            "params": sum(p.numel() for p in trainer.model.parameters()), "world_size": args.world_size}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/hf-trainer")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save_steps", type=int, default=8)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
    cli = parser.parse_args()
    result = main(cli.out, cli.steps, cli.save_steps, cli.resume)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(os.path.join(cli.out, "result.json"), "w") as fh:
            json.dump(result, fh, indent=2)
        first, last = min(result["losses"]), max(result["losses"])
        done = (f"switched at step {result['switch_step']} to ranks {result['ranks']}" if result["switch_step"]
                else "resumed with the checkpoint's layout" if cli.resume else "no switch")
        print(f"{done}; {result['params']:,} parameters; loss {result['losses'][first]:.3f} (step {first}) -> "
              f"{result['losses'][last]:.3f} (step {last})")
