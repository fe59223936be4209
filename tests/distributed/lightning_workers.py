"""Rank bodies for tests/distributed/test_lightning.py: real Lightning Trainers (DDP strategy, gloo, CPU).

One 2-rank job runs four fits in the same processes (the process group is the harness's; Lightning's
DDPStrategy joins it, LightningEnvironment sees LOCAL_RANK and launches nothing):

1. the reference: the same LightningModule, data and Trainer flags, no callback;
2. the callback run: LowRankCallback + ModelCheckpoint, Cuttlefish switch inside fit;
3. the resume: a fresh module, a fresh callback, `trainer.fit(ckpt_path=<checkpoint after the switch>)`;
4. InRank growth inside fit, next to the same job through the library's own DDP loop (no Lightning).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

SAMPLES = 1024          # a Fashion-MNIST slice: 16 micro-batches of 32 per rank per epoch
BATCH = 32
ACCUMULATE = 2          # so 8 optimizer steps per epoch
STEPS = 16              # two epochs
CKPT_STEP = 8           # the end of epoch 1, after the switch
LR = (2e-3, 1e-3)       # weights (decay group), biases (no-decay group)


def lr_factor(step: int) -> float:
    """The LambdaLR schedule of both groups (stepped per optimizer step)."""
    return 1.0 / (1.0 + 0.05 * step)


LOWRANK = {"strategy": "cuttlefish", "target_modules": ["net.1", "net.3"],
           "monitor": {"cadence_steps": 2},
           "cuttlefish": {"ema_window": 3, "last_k": 3, "threshold": 0.5, "min_switch_step": 4,
                          "max_switch_step": 6},
           "switch": {"profile_layers": False}}


INRANK = {"strategy": "inrank", "target_modules": ["net.1", "net.3"],
          "inrank": {"init_rank": 2, "warmup": 4, "gap": 2, "tau": 0.9, "buffer": 6, "capacity_multiple": 4,
                     "growth_factor": 1.5, "w0_mode": "frozen"}}


def quiet() -> None:
    """No progress bar / summary / logger noise from Lightning in test output."""
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def fmnist_subset() -> torch.utils.data.TensorDataset:
    from dist_lowrank.data.fashion_mnist import load_fashion_mnist

    x, y = load_fashion_mnist("train")
    return torch.utils.data.TensorDataset(x[:SAMPLES].flatten(1), y[:SAMPLES])


def lit_module_class():
    import lightning.pytorch as pl

    class LitMLP(pl.LightningModule):
        """A user's module: an MLP, two param groups (decay / no decay, with a key of the user's own), a
        per-step LambdaLR. Records every micro-batch's loss (the reference needs no callback for it)."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                                     nn.Linear(128, 10))
            self.losses: list[float] = []
            self.wiring: dict[str, Any] = {}
            self.dense_at_step: Optional[torch.Tensor] = None   # net.1's weight after the last dense step
            self.switched: Optional[dict[str, torch.Tensor]] = None  # its factors right after the switch

        def optimizer_step(self, *args, **kwargs) -> None:
            super().optimizer_step(*args, **kwargs)
            if isinstance(self.net[1], nn.Linear):
                self.dense_at_step = self.net[1].weight.detach().clone()

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # after the callbacks' hook
            if self.switched is None and type(self.net[1]).__name__ == "LowRankLinear":
                layer = self.net[1]
                self.switched = {"a": layer.second.weight.detach().clone(), "b": layer.first.weight.detach().clone(),
                                 "dense": self.dense_at_step, "step": self.trainer.global_step}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.losses.append(float(loss.detach()))
            return loss

        def on_train_end(self) -> None:
            self.wiring = wiring(self.trainer, self)  # before the strategy's teardown unwraps the module

        def configure_optimizers(self):
            decay = [p for n, p in self.named_parameters() if p.ndim >= 2]
            no_decay = [p for n, p in self.named_parameters() if p.ndim < 2]
            optimizer = torch.optim.AdamW([{"params": decay, "lr": LR[0], "weight_decay": 0.1, "tag": "decay"},
                                           {"params": no_decay, "lr": LR[1], "weight_decay": 0.0, "tag": "bias"}])
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lr_factor, lr_factor])
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return LitMLP


def trainer(callbacks: list, **extra: Any):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS,
                      accumulate_grad_batches=ACCUMULATE, enable_progress_bar=False, enable_model_summary=False,
                      logger=False, enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks),
                      num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks, **extra)


def step_losses(micro: list[float]) -> list[float]:
    """Per optimizer step: the mean of its micro-batches' losses."""
    return [sum(micro[i:i + ACCUMULATE]) / ACCUMULATE for i in range(0, len(micro), ACCUMULATE)]


def checksum(module: nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in module.parameters()))


def wiring(trainer_, module) -> dict[str, Any]:
    """Where Lightning's references point after fit: the strategy's DDP wrapper, its optimizer, the
    LightningOptimizer and the scheduler must all be over the module's current parameters."""
    from torch.nn.parallel import DistributedDataParallel

    params = {id(p) for p in module.parameters()}
    optimizer = trainer_.optimizers[0]
    opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    wrapper = trainer_.strategy.model
    scheduler = trainer_.lr_scheduler_configs[0].scheduler
    return {"ddp_over_module": isinstance(wrapper, DistributedDataParallel) and wrapper.module is module,
            "ddp_params": {id(p) for p in wrapper.parameters()} == params,
            "optimizer_params": opt_params == params,
            "lightning_optimizer": trainer_.strategy._lightning_optimizers[0]._optimizer is optimizer,
            "scheduler_bound": scheduler.optimizer is optimizer,
            "scheduler_last_epoch": scheduler.last_epoch,
            "groups": [{"tag": g["tag"], "lr": g["lr"], "weight_decay": g["weight_decay"], "n": len(g["params"])}
                       for g in optimizer.param_groups],
            "kinds": {n: type(m).__name__ for n, m in module.net.named_children()}}


def fit_runs(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """The three fits (module docstring); returns per-rank losses, the switch, the wiring after fit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dist_lowrank.checkpoint.manifest import layout_of
    from dist_lowrank.integrations.lightning import LowRankCallback, load_lowrank_checkpoint

    quiet()
    LitMLP = lit_module_class()
    data = fmnist_subset()

    def loader():
        return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True,
                                           generator=torch.Generator().manual_seed(0))

    reference = LitMLP()
    trainer(callbacks=[]).fit(reference, loader())

    ckpt_dir = Path(out_dir) / "ckpt"
    module = LitMLP()
    callback = LowRankCallback(LOWRANK)
    checkpoints = ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=8, save_top_k=-1)
    run = trainer(callbacks=[callback, checkpoints])
    run.fit(module, loader())
    switches = [e for e in callback.controller.events if e["event"] == "switch"]

    loaded = load_lowrank_checkpoint(LitMLP(), ckpt_dir / f"step={CKPT_STEP}.ckpt")  # no Trainer: inference
    saved = torch.load(ckpt_dir / f"step={CKPT_STEP}.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    loaded_equal = sorted(loaded.state_dict()) == sorted(saved) and all(
        torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())

    resumed = LitMLP()
    callback2 = LowRankCallback(LOWRANK)
    run2 = trainer(callbacks=[callback2])
    run2.fit(resumed, loader(), ckpt_path=str(ckpt_dir / f"step={CKPT_STEP}.ckpt"))

    inrank = LitMLP()
    callback3 = LowRankCallback(INRANK)
    run3 = trainer(callbacks=[callback3])
    run3.fit(inrank, loader())

    return {"inrank": {"losses": step_losses(inrank.losses), "changes": changes(callback3.controller.events),
                       "ranks": callback3.controller.ranks, "capacities": callback3.controller.capacities,
                       "wiring": inrank.wiring, "checksum": checksum(inrank),
                       "library": library_inrank(rank, world, data, LitMLP)},
            "refusals": refusals(), "reference": step_losses(reference.losses), "losses": step_losses(module.losses),
            "resumed": step_losses(resumed.losses),
            "switch_step": switches[0]["step"] if switches else None,
            "ranks": switches[0]["ranks"] if switches else {},
            "layout": layout_of(module), "resumed_layout": layout_of(resumed),
            "loaded_layout": layout_of(loaded), "loaded_equal": loaded_equal,
            "wiring": module.wiring, "resumed_wiring": resumed.wiring,
            "switched": module.switched, "checksum": checksum(module), "resumed_checksum": checksum(resumed),
            "reference_checksum": checksum(reference), "resumed_active": callback2.controller.active,
            "resumed_changes": changes(callback2.controller.events), "changes": changes(callback.controller.events),
            "global_steps": (run.global_step, run2.global_step)}


def changes(events: list[dict[str, Any]]) -> list[tuple]:
    """The shape changes of a run: (step, kind, ranks, capacities)."""
    return [(e["step"], e["event"], dict(e.get("ranks", {})), dict(e.get("capacities", {}))) for e in events
            if e["event"] in ("switch", "grow")]


def library_inrank(rank: int, world: int, data, module_class) -> dict[str, Any]:
    """The reference for the InRank fit: the same module, groups, scheduler and data order (Lightning's
    DistributedSampler, seed 0, set_epoch per epoch; two micro-batches per step, no_sync on the first) through
    the library's documented DDP loop (`DDPBackend` + `attach` + `controller.after_step`), without Lightning."""
    from contextlib import nullcontext

    from dist_lowrank import attach
    from dist_lowrank.backends.ddp_backend import DDPBackend
    from dist_lowrank.config import load_config
    from dist_lowrank.methods import prepare_model

    cfg = load_config(INRANK)
    module = prepare_model(module_class(), cfg)
    configured = module.configure_optimizers()
    backend = DDPBackend(module, configured["optimizer"], configured["lr_scheduler"]["scheduler"])
    controller = attach(backend, cfg)
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    losses, step, micro = [], 0, []
    while step < STEPS:
        sampler.set_epoch(step // 8)
        for i, (x, y) in enumerate(torch.utils.data.DataLoader(data, batch_size=BATCH, sampler=sampler)):
            with backend.model.no_sync() if i % ACCUMULATE == 0 else nullcontext():
                loss = F.cross_entropy(backend.model(x), y)
                (loss / ACCUMULATE).backward()
            micro.append(float(loss.detach()))
            if i % ACCUMULATE == ACCUMULATE - 1:
                backend.step()
                step += 1
                controller.after_step(step, sum(micro[-ACCUMULATE:]) / ACCUMULATE)
                if step == STEPS:
                    break
    return {"losses": step_losses(micro), "changes": changes(controller.events), "checksum": checksum(module)}


def refusals() -> dict[str, str]:
    """What Lightning says to FSDP on CPU (its FSDPStrategy is FSDP1 and needs CUDA), and what the callback says
    to an FSDPStrategy on any device (FSDP1 cannot change shapes; see UNSUPPORTED_STRATEGY)."""
    from types import SimpleNamespace

    import lightning.pytorch as pl
    from lightning.pytorch.strategies import FSDPStrategy

    from dist_lowrank.integrations.lightning import LowRankCallback

    out = {}
    try:
        pl.Trainer(accelerator="cpu", devices=2, strategy="fsdp", logger=False)
        out["lightning"] = "built"
    except ValueError as exc:
        out["lightning"] = str(exc)
    try:  # the hook reads only trainer.strategy; a CUDA machine would get here with a real Trainer
        LowRankCallback(LOWRANK).setup(SimpleNamespace(strategy=FSDPStrategy()), lit_module_class()(), "fit")
        out["callback"] = "accepted"
    except Exception as exc:  # noqa: BLE001 - the test checks type and text
        out["callback"] = f"{type(exc).__name__}: {exc}"
    try:
        from lightning.pytorch.strategies import DDPStrategy

        LowRankCallback({"strategy": "dlrt", "target_modules": ["net.1"]}).setup(
            SimpleNamespace(strategy=DDPStrategy()), lit_module_class()(), "fit")
        out["method"] = "accepted"
    except Exception as exc:  # noqa: BLE001
        out["method"] = f"{type(exc).__name__}: {exc}"
    return out


def expected_group_lrs(step: int) -> list[float]:
    """Plain arithmetic: each group's lr after `step` scheduler steps."""
    return [lr * lr_factor(step) for lr in LR]



