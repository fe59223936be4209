"""PyTorch Lightning: one callback runs the low-rank method inside `trainer.fit()` (DDP strategy, or one device).

    trainer = L.Trainer(strategy="ddp", callbacks=[LowRankCallback("lowrank.yaml"), ModelCheckpoint(...)])
    trainer.fit(module)                                   # the switch happens inside fit
    trainer.fit(fresh_module, ckpt_path="last.ckpt")      # resume after the switch: shapes rebuilt first

Lightning owns the loop, the DDP wrapper, the optimizer and the schedulers; the library owns the decision and
the reshard. The bridge is a backend adapter (`LightningDDPBackend`, a `DDPBackend` whose wrapper is the
strategy's own: `DDPStrategy.configure_ddp` wraps again after a rebuild, with the user's DDP kwargs and comm
hooks) that, after every rebuild, points what Lightning keeps at the new objects: `strategy.model` (the new
DDP wrapper), `strategy.optimizers` (its setter re-creates `strategy._lightning_optimizers`, which the
automatic loop steps) and `trainer.lr_scheduler_configs[i].scheduler` (the same scheduler object, re-bound to
the new optimizer at its position by the backend).

Hook order (lightning/pytorch/trainer/trainer.py `_run`): `setup` → checkpoint restore of the *model* (before
the strategy wraps it, for DDP) → callbacks' `load_state_dict` → `strategy.setup` (DDP wrap, `configure_optimizers`)
→ `on_fit_start` → restore of optimizer / scheduler state → training. So on resume the layout (factorized
ranks, InRank widths) must reach the module before its state dict loads: `setup` wraps the strategy's
`load_model_state_dict` (a public method, overridden on this strategy instance only) to apply the layout the
callback stored in the checkpoint (`checkpoint["callbacks"][state_key]`), and `on_fit_start` rebuilds the
optimizer from the saved param-group layout (the checkpoint's parameter order), so that Lightning's own
positional `optimizer.load_state_dict` then fills the right tensors.

FSDP (Lightning 2.6's `FSDPStrategy` is FSDP1, `FullyShardedDataParallel`): not supported — see
`UNSUPPORTED_STRATEGY` below for why and what to use instead. On CPU Lightning itself refuses it ("The strategy
`fsdp` requires a GPU accelerator"), so the refusal here is what a CUDA user meets.

Lightning APIs this module relies on (lightning 2.6.6): public — `DDPStrategy.configure_ddp`, the
`Strategy.model` / `Strategy.optimizers` setters, `Strategy.restore_checkpoint_after_setup`,
`Trainer.lr_scheduler_configs`, `Trainer.estimated_stepping_batches`; overridden per instance —
`Strategy.load_model_state_dict` (to apply the layout first); private, read only —
`DDPStrategy._ddp_comm_hook` (a user's DDP comm hook: DDP takes one hook, so telemetry must not add its own).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from dist_lowrank.api import start_controller
from dist_lowrank.backends.ddp_backend import DDPBackend
from dist_lowrank.backends.local_backend import LocalBackend
from dist_lowrank.checkpoint.manifest import apply_layout, check_param_shapes, layout_of, param_shapes
from dist_lowrank.config import LowRankConfig, load_config
from dist_lowrank.controller import LowRankController
from dist_lowrank.errors import CheckpointError, ConfigError
from dist_lowrank.methods import prepare_model

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
except ImportError as exc:  # pragma: no cover - the integration is optional
    raise ImportError("dist_lowrank.integrations.lightning needs `lightning` (pip install lightning)") from exc

UNSUPPORTED_STRATEGY = (
    "LowRankCallback: strategy {name} is not supported; use strategy='ddp' (or one device). "
    "Lightning's FSDPStrategy is FSDP1 (FullyShardedDataParallel over flat parameters): a switch changes "
    "parameter shapes, which FSDP1 cannot do in place (swapping a child without re-wrapping silently stops "
    "training it) and Lightning wraps the model once, in strategy.setup, with no hook to re-wrap; for sharded "
    "training use dist_lowrank's FSDP2Backend (fully_shard, rebuilt at the switch) or DeepSpeed "
    "(dist_lowrank.deepspeed_api.initialize) in your own loop"
)


STATE_KEY = "LowRankCallback"
# Methods whose whole update happens at optimizer-step boundaries (a switch, a growth) and in the gradients
# after backward (Frobenius decay): DLRT's integrator needs the step's activations and extra passes, and the
# tensor method adds a KL term to the loss, neither of which a callback can do inside Lightning's closure.
SUPPORTED_METHODS = ("cuttlefish", "inrank", "fixed", "none")


def restore_layout(module: nn.Module, checkpoint: Mapping[str, Any]) -> nn.Module:
    """Give `module` the shapes a LowRankCallback checkpoint was saved with (empty factorized / InRank layers of
    the saved ranks), so its state dict loads; layers that already have them are left alone. A checkpoint
    without the callback's entry leaves the module as it is."""
    saved = (checkpoint.get("callbacks") or {}).get(STATE_KEY)
    if saved:
        live = layout_of(module)
        apply_layout(module, {n: e for n, e in saved["layout"].items() if live.get(n) != e})
        check_param_shapes(module, saved["param_shapes"])
    return module


def load_lowrank_checkpoint(module: nn.Module, ckpt_path: Union[str, Path], strict: bool = True) -> nn.Module:
    """Outside a Trainer (inference, export): a freshly built LightningModule with a checkpoint's switched
    layout and weights (`LightningModule.load_from_checkpoint` would meet the dense shapes and fail)."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # Lightning's own files
    restore_layout(module, checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return module


class _LightningAdapter:
    """What both adapters add to a library backend: the strategy holds the objects the loop uses, so every
    rebuild republishes them there. Mixed in before LocalBackend / DDPBackend, whose reshard logic is reused."""

    strategy: "pl.strategies.Strategy"
    trainer: "pl.Trainer"
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def release(self) -> None:
        """Drop the old wrapper and optimizer everywhere Lightning keeps them, before the new ones exist."""
        super().release()  # type: ignore[misc]
        self.strategy.model = self.module          # the strategy's wrapper over the old parameters goes
        self.strategy.optimizers = []              # and the LightningOptimizers over the old optimizer

    def rebuild(self, change: Any, modules: dict[str, nn.Module], values: dict[str, torch.Tensor],
                states: dict[str, dict[str, Any]]) -> dict[str, Any]:
        out = super().rebuild(change, modules, values, states)  # type: ignore[misc]
        self.publish()
        return out

    def publish(self) -> None:
        """Point Lightning at the backend's optimizer and scheduler (after a rebuild, or a resume that built
        the optimizer from the checkpoint's param-group layout)."""
        self.strategy.optimizers = [self.optimizer]  # the setter re-creates strategy._lightning_optimizers
        configs = self.trainer.lr_scheduler_configs
        if configs:
            configs[0].scheduler = self.scheduler  # the same object, re-bound to the new optimizer


class LightningDDPBackend(_LightningAdapter, DDPBackend):
    """DDPBackend over the LightningModule whose DDP wrapper is made by Lightning's DDPStrategy."""

    def __init__(self, trainer: "pl.Trainer", optimizer: torch.optim.Optimizer, scheduler: Any = None,
                 param_groups: Optional[list[dict[str, Any]]] = None) -> None:
        """optimizer / scheduler: what `configure_optimizers` returned (instances); param_groups: a checkpoint's
        saved layout (resume). The module is already on its device and wrapped by the strategy."""
        self.trainer, self.strategy = trainer, trainer.strategy
        # DDPBackend.__init__ is skipped on purpose: it moves the module and wraps it in a DDP of its own, and
        # here the strategy did both already; its wrap/rebuild logic is what this class reuses.
        self.ddp_kwargs = {}
        # DDPStrategy._ddp_comm_hook (private, read only): a user's hook, which the strategy registers itself at
        # every configure_ddp; DDP allows one hook, so telemetry must not add its counter on top of it.
        self._strategy_hook = getattr(self.strategy, "_ddp_comm_hook", None)
        self.comm_hook = self._strategy_hook
        self._adopted = False
        LocalBackend.__init__(self, self.strategy.lightning_module, optimizer, scheduler, param_groups)

    def wrap(self, module: nn.Module) -> nn.Module:
        """First call: the strategy's existing wrapper. After a rebuild: the strategy wraps the module again
        (its device ids, DDP kwargs, comm hook), and the telemetry's counter hook is re-registered."""
        if not self._adopted:
            self._adopted = True
            return self.strategy.model
        self.strategy.model = module
        self.strategy.configure_ddp()
        wrapped = self.strategy.model
        if self.comm_hook is not None and self.comm_hook is not self._strategy_hook:
            wrapped.register_comm_hook(None, self.comm_hook)
        return wrapped


class LightningLocalBackend(_LightningAdapter, LocalBackend):
    """One device (SingleDeviceStrategy): the LightningModule itself is what the loop calls."""

    def __init__(self, trainer: "pl.Trainer", optimizer: torch.optim.Optimizer, scheduler: Any = None,
                 param_groups: Optional[list[dict[str, Any]]] = None) -> None:
        self.trainer, self.strategy = trainer, trainer.strategy
        LocalBackend.__init__(self, self.strategy.lightning_module, optimizer, scheduler, param_groups)

    def wrap(self, module: nn.Module) -> nn.Module:
        self.strategy.model = module
        return module


class LowRankCallback(Callback):
    """Runs the configured low-rank method (Cuttlefish switch, InRank growth, ...) inside `trainer.fit()`.

    config: a `lowrank` section (LowRankConfig, dict, or a YAML/JSON path). steps_per_epoch: for cadences in
    epochs; default: the trainer's optimizer steps per epoch. The controller is `callback.controller` (events,
    ranks) once fit has started. Checkpoints (`ModelCheckpoint`) carry the layout and the controller's state in
    the callback's entry, so `trainer.fit(model, ckpt_path=...)` resumes before, at or after a switch."""

    @property
    def state_key(self) -> str:
        """The callback's entry in a checkpoint's "callbacks" (fixed: `restore_layout` finds it without a callback)."""
        return STATE_KEY

    def __init__(self, config: Union[LowRankConfig, dict, str, Path], steps_per_epoch: Optional[int] = None) -> None:
        self.cfg = config if isinstance(config, LowRankConfig) else load_config(config)
        self.steps_per_epoch = steps_per_epoch
        self.backend: Optional[LocalBackend] = None
        self.controller: Optional[LowRankController] = None
        self._resume: Optional[dict[str, Any]] = None
        self._last_step = 0
        self._step_loss = 0.0
        self._shapes: Any = None
        self._patched: Optional[Any] = None

    # -- before the strategy wraps the model ------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Check the strategy, give the module the method's own layers (InRank) before `configure_optimizers`
        sees its parameters, and make a checkpoint's model restore apply the saved layout first."""
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)) or strategy.restore_checkpoint_after_setup:
            raise ConfigError(UNSUPPORTED_STRATEGY.format(name=type(strategy).__name__))
        if self.cfg.strategy not in SUPPORTED_METHODS:
            raise ConfigError(f"lowrank.strategy: {self.cfg.strategy!r} is not supported by LowRankCallback (its "
                              f"updates need the loss or the step's activations, which Lightning's closure keeps); "
                              f"allowed: {', '.join(SUPPORTED_METHODS)}")
        if not pl_module.automatic_optimization:
            raise ConfigError("LowRankCallback: manual optimization is not supported (the callback acts at the "
                              "automatic loop's optimizer steps); set automatic_optimization = True")
        if prepare_model(pl_module, self.cfg) is not pl_module:
            raise ConfigError(f"LowRankCallback: strategy {self.cfg.strategy!r} replaces the whole model; "
                              f"prepare it yourself before fit (methods.prepare_model)")
        self._patch_model_restore(strategy)

    def _patch_model_restore(self, strategy: "pl.strategies.Strategy") -> None:
        """Wrap `strategy.load_model_state_dict` on this instance: the saved layout goes onto the module (empty
        factorized / InRank layers of the saved shapes) before Lightning loads the state dict into it."""
        original = strategy.load_model_state_dict

        def load_model_state_dict(checkpoint: Mapping[str, Any], strict: bool = True) -> None:
            restore_layout(strategy.lightning_module, checkpoint)
            return original(checkpoint, strict=strict)

        strategy.load_model_state_dict = load_model_state_dict  # instance attribute; removed at teardown
        self._patched = strategy

    # -- after the strategy set up model and optimizer ----------------------------------------------------
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Build the backend over the strategy's objects and start the controller (the init measurement on a
        fresh run; the saved decision state on resume). Runs before Lightning restores optimizer state."""
        from dist_lowrank.telemetry.library import library_telemetry

        optimizers = trainer.strategy.optimizers
        if len(optimizers) != 1:
            raise ConfigError(f"LowRankCallback: configure_optimizers returned {len(optimizers)} optimizers; "
                              f"the callback drives exactly one")
        configs = trainer.lr_scheduler_configs
        if len(configs) > 1:
            raise ConfigError(f"LowRankCallback: configure_optimizers returned {len(configs)} LR schedulers; "
                              f"at most one is supported (chain them with SequentialLR / ChainedScheduler)")
        optimizer = optimizers[0]
        scheduler = configs[0].scheduler if configs else None
        resume = self._resume
        groups = resume["param_groups"] if resume else None
        if resume:
            check_param_shapes(pl_module, resume["param_shapes"])  # the model restore applied the layout
        adapter = LightningDDPBackend if isinstance(trainer.strategy, DDPStrategy) else LightningLocalBackend
        self.backend = backend = adapter(trainer, optimizer, scheduler, param_groups=groups)
        if backend.optimizer is not optimizer:
            backend.publish()  # resume: the optimizer in the checkpoint's group layout, filled by Lightning next
        telemetry = library_telemetry(backend, self.cfg, source="lightning")
        self.controller = start_controller(backend, self.cfg, self._steps_per_epoch(trainer), telemetry,
                                           resume_state=resume["controller"] if resume else None)
        if resume and self.controller is not None:
            self.controller.events[:0] = list(resume.get("events", []))  # the switch before the save
        self._last_step = trainer.global_step if resume is None else int(resume["step"])
        self._resume = None  # used once: a later fit of this trainer without ckpt_path starts afresh

    def _steps_per_epoch(self, trainer: "pl.Trainer") -> Optional[int]:
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        # estimated_stepping_batches (public) sets up the train dataloader, so num_training_batches is known
        trainer.estimated_stepping_batches
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return None
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    # -- every batch ----------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        """Record the targeted layers' input shapes over one forward (the switch times layers at them)."""
        if self.controller is not None and self._shapes is None:
            context = self.controller.record_shapes()
            context.__enter__()
            self._shapes = context

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: torch.optim.Optimizer) -> None:
        """The method's gradient terms (Frobenius decay on factors), once per optimizer step, after the last
        micro-batch's backward and before Lightning clips gradients."""
        if self.controller is not None:
            self.controller.after_backward()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        """After an optimizer step (global_step moved; with accumulate_grad_batches only at the boundary): the
        controller decides and may reshard. The step's loss is the sum of Lightning's normalized micro-batch
        losses, i.e. their mean."""
        if self._shapes is not None and self._shapes is not False:
            self._shapes.__exit__(None, None, None)
            self._shapes = False
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._step_loss += float(loss.detach())
        step = trainer.global_step
        if step == self._last_step:
            return  # accumulating (or a skipped step): no optimizer step happened
        self._last_step = step
        loss_value, self._step_loss = self._step_loss, 0.0
        if self.controller is not None:
            self.controller.after_step(step, loss_value)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed fit needs before and after the model exists: layout and parameter shapes (applied
        before the model's state loads), the param-group layout by name (the optimizer is rebuilt in it), the
        controller's decision state and the step it belongs to."""
        if self.backend is None:
            return {}
        module = self.backend.unwrapped_model()
        return {"layout": layout_of(module), "param_shapes": param_shapes(module),
                "param_groups": self.backend.engine_meta()["param_groups"],
                "controller": self.controller.state_dict() if self.controller is not None else None,
                "step": self._last_step, "strategy": self.cfg.strategy,
                "events": [e for e in (self.controller.events if self.controller else []) if e["event"] != "estimate"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("strategy") != self.cfg.strategy:
            raise CheckpointError(f"LowRankCallback: the checkpoint was written with strategy "
                                  f"{state_dict.get('strategy')!r}, this callback runs {self.cfg.strategy!r}")
        self._resume = dict(state_dict)

    # -- the end ----------------------------------------------------------------------------------------------
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self._patched is not None:
            vars(self._patched).pop("load_model_state_dict", None)
            self._patched = None
        if self._shapes not in (None, False):
            self._shapes.__exit__(None, None, None)
        self._shapes = None

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Write the telemetry's summary and report (all ranks together), when `lowrank.logging` asks for them."""
        if self.controller is not None:
            self.controller.close()
