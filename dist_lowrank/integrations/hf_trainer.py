"""Low-rank training inside `transformers.Trainer.train()` on DeepSpeed (the ds_config's `"lowrank"` section).

    from dist_lowrank.integrations.hf_trainer import LowRankTrainer      # was: from transformers import Trainer
    args = TrainingArguments(output_dir="out", deepspeed="ds_config.json", save_steps=50, report_to=["tensorboard"])
    trainer = LowRankTrainer(model=model, args=args, train_dataset=data)  # every other argument unchanged
    trainer.train()                                      # the switch (Cuttlefish) or growth (InRank) happens in here
    trainer.train(resume_from_checkpoint=True)           # also across a switch: the saved shapes are rebuilt first

A Trainer subclass (or `LowRankTrainerMixin` for a user's own Trainer subclass), because a callback alone cannot
follow a rebuilt engine: `Trainer._run_epoch` keeps the engine in a local variable and hands it to
`training_step`, `_clip_grad_norm` and `_get_grad_norm` (overridden here to use the current engine). The work:

- `create_optimizer`: the Trainer's own optimizer is kept as the recipe for rebuilt ones and its param groups,
  by name, as the layout (`backends.param_groups`); on resume the optimizer is built from the checkpoint's saved
  layout (companion groups included), since ZeRO's optimizer checkpoint is per flat group;
- after accelerate built the engine (`_prepare_for_training`), a `DeepSpeedBackend` adopts it
  (`TrainerDeepSpeedBackend`) and the controller starts (the init measurement; on resume its saved state);
- every optimizer step (`on_step_end` of an internal callback) runs `controller.after_step`; after a rebuild every
  reference the Trainer and accelerate hold is pointed at the new engine, optimizer and scheduler (`_repoint`);
- every Trainer checkpoint gets `manifest.json` (layout, controller state, param-group layout); `train(
  resume_from_checkpoint=...)` reads it and gives the model the saved shapes (`apply_layout`) before DeepSpeed
  loads its state.
The Trainer's own logging (`report_to=["tensorboard"]`, ...) is untouched; `lowrank.logging` adds the library's.
Only DeepSpeed engines are supported here: a Trainer without one is refused by name (FSDP through accelerate is
not adopted: accelerate 1.16 enables FSDP only on accelerator hosts, so it cannot be tested on CPU here).
On a host without an accelerator call `configure_accelerate_for_deepspeed()` before `TrainingArguments`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend
from dist_lowrank.config import LowRankConfig, from_ds_config, load_config
from dist_lowrank.deepspeed_api import step_loss
from dist_lowrank.errors import CheckpointError, ConfigError

log = logging.getLogger("dist_lowrank")

LowRankSpec = Union[LowRankConfig, dict, str, Path, None]


class TrainerDeepSpeedBackend(DeepSpeedBackend):
    """A DeepSpeedBackend over the engine accelerate already built for the Trainer (the first engine is
    adopted, not initialized again); rebuilds, state transplant and checkpoints are DeepSpeedBackend's own."""

    def __init__(self, engine: Any, config: dict, optimizer_factory: Any, param_groups: Optional[list[dict]]) -> None:
        """config: the ds_config accelerate passed to `deepspeed.initialize` ("auto" values filled), reused for
        every rebuild; optimizer_factory: a recipe params -> optimizer (None: the ds_config's optimizer);
        param_groups: the layout of the Trainer's client optimizer (`GroupLayout.to_meta()`)."""
        self._adopted = engine
        super().__init__(engine.module, config, optimizer_factory, param_groups=param_groups)

    def _initialize(self, module: nn.Module, optimizer: Optional[torch.optim.Optimizer], scheduler: Any,
                    first: bool = False):
        if first and self._adopted is not None:  # the base class's first engine: the Trainer's
            engine, self._adopted = self._adopted, None
            return engine, None
        return super()._initialize(module, optimizer, scheduler, first)


def configure_accelerate_for_deepspeed() -> None:
    """accelerate's shared process state for DeepSpeed, built before `TrainingArguments`, which must then be given
    `accelerator_config={"use_configured_state": True}`. Needed where torch has no accelerator (CPU hosts):
    accelerate 1.16's PartialState finds no distributed backend there and, with DeepSpeed, reports one process
    however many ranks run (DeepSpeed then refuses the batch sizes). Harmless elsewhere. Collective-free; call on
    every rank after the process group exists (or with the launcher's environment)."""
    from accelerate.state import PartialState

    from dist_lowrank.backends.ds_runtime import prepare_deepspeed
    from dist_lowrank.device import default_dist_backend

    prepare_deepspeed()  # CPU: DeepSpeed's accelerator, and no JIT build of the inference-only shm op (50-90 s)
    if PartialState._shared_state:  # accelerate's private shared state: already configured
        return
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # how TrainingArguments itself asks accelerate for DeepSpeed
    try:
        PartialState(backend=default_dist_backend())
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous


def _section(args: Any, lowrank: LowRankSpec) -> Optional[LowRankConfig]:
    """The `lowrank` config. With a ds_config (TrainingArguments(deepspeed=dict or path)): its "lowrank" section,
    else the `lowrank` argument, else the plugin's defaults (as `deepspeed_api.initialize` reads a ds_config).
    Without one: the `lowrank` argument (a file, dict or LowRankConfig), or None (the plugin is off)."""
    ds = getattr(args, "deepspeed", None)
    if ds is not None:
        import json

        data = ds if isinstance(ds, dict) else json.loads(Path(ds).read_text())
        if "lowrank" in data and lowrank is not None:
            raise ConfigError("lowrank: given both as the Trainer argument and in the ds_config's \"lowrank\" "
                              "section; keep one")
        if "lowrank" in data or lowrank is None:
            return from_ds_config(data)
    if lowrank is None:
        return None
    return lowrank if isinstance(lowrank, LowRankConfig) else load_config(lowrank)


class LowRankTrainerCallback(TrainerCallback):
    """Runs the plugin's per-step and per-save work inside the Trainer's loop (every rank); added by
    LowRankTrainerMixin, which it calls back."""

    def __init__(self, trainer: "LowRankTrainerMixin") -> None:
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._lowrank_step_begin()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._lowrank_after_step(int(state.global_step))

    def on_save(self, args, state, control, **kwargs):
        self.trainer._lowrank_save_manifest(int(state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._lowrank_close()


class LowRankTrainerMixin:
    """Put before `transformers.Trainer` (or a subclass of it) in the bases; see the module docstring.

    lowrank: the `lowrank` section when the ds_config has none (a file, dict or LowRankConfig); steps_per_epoch:
    for `monitor.cadence_epochs` (default: the train dataloader's optimizer steps per epoch)."""

    def __init__(self, model: Optional[nn.Module] = None, args: Any = None, *rest: Any, lowrank: LowRankSpec = None,
                 steps_per_epoch: Optional[int] = None, **kwargs: Any) -> None:
        cfg = _section(args, lowrank)
        if cfg is not None and cfg.strategy != "none" and model is not None:
            import dist_lowrank

            model = dist_lowrank.prepare_model(model, cfg)  # the method's own layers (InRank) before any engine
        self._lowrank_cfg = cfg
        self._lowrank_steps_per_epoch = steps_per_epoch
        self._lowrank_backend: Optional[TrainerDeepSpeedBackend] = None
        self._lowrank_controller = None
        self._lowrank_telemetry = None
        self._lowrank_counter = None
        self._lowrank_manifest = None  # the manifest of the checkpoint being resumed
        self._lowrank_recipe = None
        self._lowrank_layout = None
        self._lowrank_micro: list[float] = []
        self._lowrank_skipped = 0
        if cfg is not None:
            from dist_lowrank.telemetry.comm import CommCounter
            from dist_lowrank.telemetry.library import wanted

            # lowrank.logging's byte counter, as early as a Trainer subclass can: TrainingArguments has usually set
            # up DeepSpeed's comm backend already, so collectives DeepSpeed bound before this are not counted
            if wanted(cfg):
                self._lowrank_counter = CommCounter().install()
        super().__init__(model, args, *rest, **kwargs)
        if cfg is not None:
            self._refuse_unsupported()
            self.add_callback(LowRankTrainerCallback(self))

    # -- what the plugin holds -------------------------------------------------------------------------
    @property
    def lowrank_controller(self):
        """The LowRankController (None before train() built the engine, or without the plugin)."""
        return self._lowrank_controller

    @property
    def lowrank_backend(self) -> Optional[TrainerDeepSpeedBackend]:
        return self._lowrank_backend

    def _refuse_unsupported(self) -> None:
        if not getattr(self, "is_deepspeed_enabled", False):
            raise ConfigError("lowrank: LowRankTrainer supports DeepSpeed engines (TrainingArguments(deepspeed=...)); "
                              "this Trainer uses none (FSDP/DDP through accelerate are not supported here: use "
                              "dist_lowrank.attach with your own loop)")

    # -- optimizer: the Trainer's own, kept as the recipe and the layout ------------------------------------
    def create_optimizer(self, model: Optional[nn.Module] = None):
        """The Trainer's optimizer; on resume the same class rebuilt with the checkpoint's param groups (ZeRO's
        optimizer checkpoint is per flat group, and a switch added companion groups)."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self._lowrank_cfg is None or optimizer is None:
            return optimizer
        from dist_lowrank.backends.param_groups import GroupLayout, first_optimizer, optimizer_recipe

        named = dict((model if model is not None else self.model).named_parameters())
        meta = (self._lowrank_manifest.engine.get("param_groups") if self._lowrank_manifest is not None else None)
        saved = GroupLayout.from_meta(meta) if meta else None
        client, self._lowrank_layout, _ = first_optimizer(optimizer, named, saved)
        self._lowrank_recipe = optimizer_recipe(optimizer)
        self.optimizer = client
        return client

    # -- the engine accelerate built: adopted by a backend, controller started ---------------------------
    # Trainer._prepare_for_training (private, transformers 5.24): the one place where the engine exists (after
    # deepspeed_init + accelerator.prepare, and after DeepSpeed loaded a resumed checkpoint) before the first step.
    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self._lowrank_cfg is not None:
            steps = self._lowrank_steps_per_epoch
            if steps is None and hasattr(train_dataloader, "__len__"):
                steps = max(1, len(train_dataloader) // max(1, self.args.gradient_accumulation_steps))
            self._lowrank_start(model, steps)
        return model, train_dataloader

    def _lowrank_start(self, engine: Any, steps_per_epoch: Optional[int]) -> None:
        from dist_lowrank.api import start_controller
        from dist_lowrank.backends import ds_state
        from dist_lowrank.checkpoint.manifest import check_layout, check_param_shapes
        from dist_lowrank.telemetry.library import library_telemetry

        cfg, manifest = self._lowrank_cfg, self._lowrank_manifest
        # accelerate's processed ds_config (what it passed to deepspeed.initialize), for every rebuilt engine
        config = {k: v for k, v in self.accelerator.state.deepspeed_plugin.deepspeed_config.items() if k != "lowrank"}
        layout = self._lowrank_layout.to_meta() if self._lowrank_layout is not None else None
        self._lowrank_backend = backend = TrainerDeepSpeedBackend(engine, config, self._lowrank_recipe, layout)
        if manifest is not None:  # DeepSpeed loaded the state in super()._prepare_for_training
            check_layout(backend.unwrapped_model(), manifest.layout)
            check_param_shapes(backend.unwrapped_model(), manifest.param_shapes)
            if ds_state.group_steps(engine)[0] is not None:
                ds_state.relink(engine)  # ZeRO-1/2 leave the fragment links of loaded state unset
        telemetry = library_telemetry(backend, cfg, "hf_trainer.LowRankTrainer", counter=self._lowrank_counter,
                                      samples_per_step=int(engine.train_batch_size()))
        self._lowrank_telemetry = telemetry
        self._lowrank_controller = start_controller(backend, cfg, steps_per_epoch, telemetry,
                                                    resume_state=manifest.controller if manifest else None)
        self._lowrank_skipped = int(getattr(engine, "skipped_steps", 0))

    # -- the Trainer's loop holds the engine in a local variable: use the current one ---------------------
    # Trainer._run_epoch passes its local `model` (the engine at train() start) to training_step and to the private
    # _clip_grad_norm / _get_grad_norm (transformers 5.24); after a rebuild that is the released engine.
    def _lowrank_current(self, model: Any) -> Any:
        backend = self._lowrank_backend
        if backend is not None and model is not backend.engine and getattr(model, "module", None) is backend.engine.module:
            return backend.engine  # a released engine over the same module (the switch replaced it)
        return model

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(self._lowrank_current(model), inputs, num_items_in_batch)
        if self._lowrank_backend is not None:
            self._lowrank_micro.append(float(loss))  # the Trainer's own per-micro-batch training loss
        return loss

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        controller = self._lowrank_controller
        if controller is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        with controller.record_shapes():  # layer input shapes for the switch's speed check
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        loss = controller.regularize(loss)  # the method's terms (rank prior, Frobenius decay) join the loss
        self._lowrank_backend.note_backward()  # the fp16 loss scale this backward uses
        return (loss, outputs) if return_outputs else loss

    def _clip_grad_norm(self, model):
        return super()._clip_grad_norm(self._lowrank_current(model))

    def _get_grad_norm(self, model, grad_norm=None):
        return super()._get_grad_norm(self._lowrank_current(model), grad_norm=grad_norm)

    # -- per optimizer step ----------------------------------------------------------------------------
    def _lowrank_step_begin(self) -> None:
        if self._lowrank_backend is not None:
            self._lowrank_skipped = int(getattr(self._lowrank_backend.engine, "skipped_steps", 0))

    def _lowrank_after_step(self, step: int) -> None:
        """After the Trainer's optimizer step (engine.step ran inside accelerator.backward): the controller
        decides, on every rank; a rebuild is followed by `_repoint`."""
        backend = self._lowrank_backend
        if backend is None:
            return
        engine = backend.engine
        backend.link_optimizer_state_once()
        micro, self._lowrank_micro = self._lowrank_micro, []
        loss = step_loss(micro, overflow=int(getattr(engine, "skipped_steps", 0)) != self._lowrank_skipped)
        controller, telemetry = self._lowrank_controller, self._lowrank_telemetry
        if controller is None:
            if telemetry is not None:
                telemetry.end_step(step, loss)
                telemetry.after_controller(step, None)
            return
        old_optimizer = engine.optimizer
        handed = self._hand_scheduler(engine)
        try:
            controller.after_step(step, loss)
        finally:
            if handed:  # the Trainer steps its scheduler itself: the engine must not step it too
                backend.engine.lr_scheduler = None
        if backend.engine is not engine:
            self._repoint(engine, old_optimizer)

    def _hand_scheduler(self, engine: Any) -> bool:
        """The Trainer's own LR scheduler (a torch LambdaLR over the client optimizer's groups, stepped by the
        Trainer, not by DeepSpeed) is handed to the engine for the controller's step, so that a rebuild re-binds
        it to the new optimizer group by group (DeepSpeedBackend re-binds `engine.lr_scheduler`). Public
        DeepSpeedEngine attribute `lr_scheduler`; reset to None afterwards."""
        from accelerate.utils import DeepSpeedSchedulerWrapper

        scheduler = self.lr_scheduler
        if engine.lr_scheduler is not None or scheduler is None or isinstance(scheduler, DeepSpeedSchedulerWrapper):
            return False  # a ds_config scheduler lives in the engine already
        engine.lr_scheduler = getattr(scheduler, "scheduler", scheduler)  # an AcceleratedScheduler's own
        return True

    def _repoint(self, old: Any, old_optimizer: Any) -> None:
        """Every reference the Trainer and accelerate keep to the released engine, pointed at the new one."""
        new = self._lowrank_backend.engine
        accelerator = self.accelerator
        # accelerate (1.16) private `_models`: the prepared models (save_state, get_state_dict, free_memory)
        accelerator._models = [new if m is old else m for m in accelerator._models]
        # accelerate's DeepSpeedEngineWrapper: accelerator.backward runs engine.backward + engine.step through it
        wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
        if wrapped is not None:
            wrapped.engine = new
        # DeepSpeedOptimizerWrapper (trainer.optimizer, in accelerate's private `_optimizers`) wraps the engine's
        # ZeRO optimizer as `.optimizer`: re-pointed in place, so every holder of the wrapper follows
        for wrapper in [self.optimizer, *accelerator._optimizers]:
            if getattr(wrapper, "optimizer", None) is old_optimizer:
                wrapper.optimizer = new.optimizer
        # accelerate's private `_schedulers`: a DeepSpeedSchedulerWrapper holds the engine's scheduler as `.scheduler`
        for scheduler in [self.lr_scheduler, *accelerator._schedulers]:
            if new.lr_scheduler is not None and hasattr(scheduler, "scheduler") and hasattr(scheduler, "optimizers"):
                scheduler.scheduler = new.lr_scheduler
        self.model_wrapped = new
        self.deepspeed = new  # Trainer's backward-compatible alias of model_wrapped
        self.model = new.module  # the same module object, with the new layers
        for attr in ("model", "optimizer", "lr_scheduler"):  # what callbacks receive (set by the Trainer once)
            setattr(self.callback_handler, attr, getattr(self, attr))

    # -- checkpoints: manifest.json next to the Trainer's files ------------------------------------------
    def _lowrank_save_manifest(self, step: int) -> None:
        """After the Trainer saved checkpoint-<step> (every rank): the layout, the controller's state and the
        param-group layout, written by the process that saves (args.should_save)."""
        backend = self._lowrank_backend
        if backend is None:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from dist_lowrank.checkpoint.manifest import Manifest, write_manifest
        from dist_lowrank.config import config_to_dict

        controller = self._lowrank_controller
        events = [e for e in (controller.events if controller else []) if e.get("event") in ("switch", "grow", "resize")]
        switch = next((e["step"] for e in events if e["event"] == "switch"), None)
        if self._lowrank_manifest is not None and switch is None:
            switch = self._lowrank_manifest.switch_step
        phase = "low" if switch is not None else "full"
        config = {"lowrank": config_to_dict(self._lowrank_cfg)}
        world = int(self.args.world_size)
        manifest = Manifest.of(backend, step=step, phase=phase, switch_step=switch,
                               controller=controller.state_dict() if controller else None, config=config,
                               world_size=world, seed=int(self.args.seed))
        directory = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if self.args.should_save and directory.is_dir():
            write_manifest(directory, manifest)

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any, **kwargs: Any):
        """Trainer.train; resuming a checkpoint written with the plugin first gives the model the saved shapes
        (`apply_layout`), so that DeepSpeed loads its state into the right parameters."""
        self._lowrank_manifest = None
        if self._lowrank_cfg is not None and resume_from_checkpoint not in (None, False):
            from transformers.trainer_utils import get_last_checkpoint

            from dist_lowrank.checkpoint.manifest import MANIFEST, apply_layout, read_manifest

            path = resume_from_checkpoint
            if path is True:
                path = get_last_checkpoint(self.args.output_dir)
            if path is not None and (Path(path) / MANIFEST).is_file():
                manifest = read_manifest(Path(path))
                if manifest.world_size != int(self.args.world_size):
                    raise CheckpointError(f"{path}: saved on {manifest.world_size} ranks, this run has "
                                          f"{self.args.world_size} (DeepSpeed loads only at the same world size)")
                saved_stage, stage = manifest.engine.get("zero_stage"), self._lowrank_zero_stage()
                if saved_stage is not None and stage is not None and saved_stage != stage:
                    raise CheckpointError(f"{path}: saved with ZeRO stage {saved_stage}, this ds_config has stage "
                                          f"{stage}; resume with zero_optimization.stage={saved_stage}")
                apply_layout(self.model, manifest.layout)
                self._lowrank_manifest = manifest
            elif path is not None and os.path.isdir(path):
                log.warning("%s: no %s (not written by the low-rank plugin): resuming with the model's own shapes",
                            path, MANIFEST)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _lowrank_zero_stage(self) -> Optional[int]:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return int(plugin.zero_stage) if plugin is not None else None

    def _lowrank_close(self) -> None:
        """lowrank.logging: the last partial window, the summary and the report (all ranks together)."""
        telemetry, self._lowrank_telemetry = self._lowrank_telemetry, None
        if telemetry is not None:
            telemetry.close()


class LowRankTrainer(LowRankTrainerMixin, Trainer):
    """`transformers.Trainer` with the low-rank plugin (see the module docstring)."""
