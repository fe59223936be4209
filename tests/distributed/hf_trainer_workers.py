"""`transformers.Trainer` runs on real ranks (module level for the spawn harness) for tests/distributed/test_hf_trainer.py.

On every rank, in one process (imports and process start paid once), real Trainer runs over the same tiny GPT-2
(random init from a GPT2Config) and the same Shakespeare character windows:
- "plain": `transformers.Trainer` with the same ds_config and TrainingArguments, no plugin (the reference);
- per ZeRO stage, "lowrank": `LowRankTrainer` (the code under test), a checkpoint after the switch, TensorBoard
  on; and "resumed": a fresh model and `LowRankTrainer.train(resume_from_checkpoint=<that checkpoint>)`.
Losses and learning rates come from the Trainer's own logs (on_log), gathered over the ranks by the Trainer.
"""
from __future__ import annotations

import glob
import json
from typing import Any, Optional

import torch



def ds_config(stage: int, lowrank: bool, **section: Any) -> dict:
    """The example's ds_config (examples/hf_trainer_ds_config.json) at ZeRO `stage`, with or without its lowrank
    section (`section`: keys set in it)."""
    from examples.hf_trainer import DS_CONFIG

    config = json.loads(open(DS_CONFIG).read())
    config["zero_optimization"]["stage"] = stage
    if not lowrank:
        config.pop("lowrank")
    else:
        config["lowrank"].update(section)
    return config


def _args(out: str, steps: int, stage: int, lowrank: bool, save_steps: int, tensorboard: bool, **section: Any):
    from examples.hf_trainer import training_args

    return training_args(out, steps, ds_config(stage, lowrank, **section), save_steps,
                         ["tensorboard"] if tensorboard else [])


class _Logs:
    """TrainerCallback that keeps the Trainer's per-step logs (loss, learning_rate, grad_norm)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        outer = self
        self.rows: dict[int, dict[str, float]] = {}

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    outer.rows[int(state.global_step)] = {k: float(v) for k, v in logs.items()
                                                          if isinstance(v, (int, float))}

        self.callback = Callback()


def _reset_accelerate() -> None:
    """A new Trainer (new Accelerator, new DeepSpeed plugin) in the same process: accelerate's shared state reset."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def trainer_runs(rank: int, world: int, out: str, stages: tuple[int, ...], steps: int, save_step: int) -> dict:
    """The reference (plain Trainer, ZeRO stages[0]), then per stage the plugin's run and its resume."""
    from examples.hf_common import gpt2
    from examples.hf_trainer import Windows
    from transformers import Trainer

    data = Windows()
    logs = _Logs()
    plain = Trainer(model=gpt2(seed=0), args=_args(f"{out}/plain", steps, stages[0], False, 10**6, False),
                    train_dataset=data, callbacks=[logs.callback])
    plain.train()
    result: dict[Any, Any] = {"plain": logs.rows}
    del plain
    _reset_accelerate()
    for stage in stages:
        result[stage] = _lowrank_runs(f"{out}/zero{stage}", stage, steps, save_step, data)
    result["inrank"] = _inrank_runs(f"{out}/inrank", stages[0], steps, data)
    return result


# InRank grows Linear layers (Llama's projections; GPT-2's Conv1D are refused by name): from init_rank 2, checks
# from step 3 every 2 steps, growth inside trainer.train().
INRANK = {"strategy": "inrank", "cuttlefish": {},
          "inrank": {"init_rank": 2, "warmup": 3, "gap": 2, "tau": 0.9, "buffer": 6, "capacity_multiple": 4,
                     "growth_factor": 1.5, "w0_mode": "frozen"}}


def _inrank_runs(out: str, stage: int, steps: int, data: Any) -> dict:
    """The reference: a plain Trainer over the model in InRank's form (`prepare_model`, W0 + U·Vᵀ, never grown);
    then LowRankTrainer with the InRank section, which grows the layers inside train()."""
    from examples.hf_common import llama
    from transformers import Trainer

    import dist_lowrank
    from dist_lowrank.integrations.hf_trainer import LowRankTrainer

    logs = _Logs()
    net = dist_lowrank.prepare_model(llama(seed=0), {"lowrank": INRANK})
    plain = Trainer(model=net, args=_args(f"{out}/plain", steps, stage, False, 10**6, False), train_dataset=data,
                    callbacks=[logs.callback])
    plain.train()
    result: dict[str, Any] = {"plain": logs.rows}
    del plain
    _reset_accelerate()
    logs = _Logs()
    trainer = LowRankTrainer(model=llama(seed=0), args=_args(f"{out}/grown", steps, stage, True, 10**6, False, **INRANK),
                             train_dataset=data, callbacks=[logs.callback])
    trainer.train()
    engine = trainer.lowrank_backend.engine
    result["lowrank"] = logs.rows
    result["events"] = [(e["event"], e["step"], dict(e.get("ranks", {}))) for e in trainer.lowrank_controller.events
                        if e["event"] in ("switch", "grow")]
    result["refs"] = {"model_wrapped": trainer.model_wrapped is engine, "optimizer": trainer.optimizer.optimizer
                      is engine.optimizer, "acc_engine": trainer.accelerator.deepspeed_engine_wrapped.engine is engine}
    del trainer, engine
    _reset_accelerate()
    return result


def _lowrank_runs(out: str, stage: int, steps: int, save_step: int, data: Any) -> dict:
    from examples.hf_common import gpt2

    from dist_lowrank.backends import ds_state
    from dist_lowrank.integrations.hf_trainer import LowRankTrainer

    result: dict[str, Any] = {}
    # the plugin: switch inside trainer.train(), a checkpoint after it, TensorBoard on; ZeRO-3 also with the
    # library's own run log (lowrank.logging)
    logs = _Logs()
    section = {"logging": {"out_dir": f"{out}/lowrank_log", "log_every": 4}} if stage == 3 else {}
    trainer = LowRankTrainer(model=gpt2(seed=0), args=_args(out, steps, stage, True, save_step, True, **section),
                             train_dataset=data, callbacks=[logs.callback])
    params_before = sum(p.numel() for p in trainer.model.parameters())
    trainer.train()
    controller, backend = trainer.lowrank_controller, trainer.lowrank_backend
    engine = backend.engine
    accelerator = trainer.accelerator
    result["lowrank"] = logs.rows
    result["events"] = [(e["event"], e["step"], dict(e.get("ranks", {}))) for e in controller.events
                        if e["event"] in ("switch", "grow")]
    result["params"] = (params_before, sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters()))
    result["refs"] = {
        "model_wrapped": trainer.model_wrapped is engine, "deepspeed": trainer.deepspeed is engine,
        "model": trainer.model is engine.module, "optimizer": trainer.optimizer.optimizer is engine.optimizer,
        "acc_models": list(accelerator._models) == [engine],
        "acc_optimizers": all(o.optimizer is engine.optimizer for o in accelerator._optimizers),
        "acc_engine": accelerator.deepspeed_engine_wrapped.engine is engine,
        "scheduler_optimizer": trainer.lr_scheduler.optimizer is ds_state.base_optimizer(engine),
        "engine_scheduler_none": engine.lr_scheduler is None,
        "callback_model": trainer.callback_handler.model is engine.module,
        "callback_optimizer": trainer.callback_handler.optimizer is trainer.optimizer,
    }
    result["factorized"] = _factorized(engine.module)
    result["groups"] = len(ds_state.base_optimizer(engine).param_groups)
    result["tb_files"] = sorted(glob.glob(f"{out}/runs/**/events.out.tfevents.*", recursive=True))
    del trainer, controller, backend, engine, accelerator
    _reset_accelerate()

    # resume from the checkpoint written after the switch: a fresh model, the same arguments
    logs = _Logs()
    resumed = LowRankTrainer(model=gpt2(seed=0), args=_args(out, steps, stage, True, save_step, False),
                             train_dataset=data, callbacks=[logs.callback])
    resumed.train(resume_from_checkpoint=f"{out}/checkpoint-{save_step}")
    result["resumed"] = logs.rows
    result["resumed_factorized"] = _factorized(resumed.lowrank_backend.engine.module)
    result["resumed_events"] = [e["event"] for e in resumed.lowrank_controller.events]
    del resumed
    _reset_accelerate()
    result["errors"] = _bad_input(out, steps, stage, data)
    return result


def _bad_input(out: str, steps: int, stage: int, data: Any) -> dict[str, str]:
    """One-line errors for a wrong lowrank section and for the section given twice (before any engine exists)."""
    from examples.hf_common import gpt2

    from dist_lowrank.errors import ConfigError
    from dist_lowrank.integrations.hf_trainer import LowRankTrainer

    errors = {}
    cases = {"bad_key": dict(args=_args(out, steps, stage, True, 10**6, False, strategy="nope")),
             "twice": dict(args=_args(out, steps, stage, True, 10**6, False), lowrank={"strategy": "cuttlefish"})}
    for name, kwargs in cases.items():
        try:
            LowRankTrainer(model=gpt2(seed=0), train_dataset=data, **kwargs)
            errors[name] = "no error"
        except ConfigError as exc:
            errors[name] = str(exc)
        _reset_accelerate()
    return errors


def _factorized(module: Any) -> list[str]:
    return sorted(n for n, m in module.named_modules() if getattr(m, "LAYOUT_TYPE", None) == "lowrank")
