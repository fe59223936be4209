"""Every private (or undocumented) torch / DeepSpeed / fairscale API the backends rely on, listed per engine, with why.

Each backend's private uses are listed here (backends/*.py, backends/ds_*.py, reshape/factorize.py,
telemetry/comm.py, gc_freeze.py); the backends do not import this registry — it is the inventory a
torch or DeepSpeed upgrade is checked against. `check(engine)` resolves each entry on the installed
versions and returns one line per missing entry naming the entry, the engine and the version:

- "import" entries: a dotted path `module.attr` (imported, then looked up);
- "attribute" entries: an attribute of an object that only exists at run time; `check` builds the
  smallest real object on this process's device (1-rank process group: the caller provides it, see
  tests/distributed/test_private_apis.py) and checks `hasattr`.

Adding a private use to a backend means adding its entry here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

ENGINES = ("torch", "fsdp2", "ddp", "deepspeed", "fairscale")


@dataclass(frozen=True)
class Entry:
    """One private API: `path` is `module.attr` for imports, `<object>.attr` for run-time attributes."""

    path: str
    why: str
    used_in: str
    kind: str = "import"  # "import" | "attribute"
    optional: bool = False  # read with a default where absent (e.g. only some configs create it): listed, not required


def _import(path: str) -> Any:
    """`module.attr[.attr...]` resolved on the installed packages (AttributeError/ImportError when gone)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


REGISTRY: dict[str, list[Entry]] = {
    "torch": [
        Entry("torch.optim.lr_scheduler.SequentialLR._schedulers",
              "a composite scheduler's children are re-bound to the rebuilt optimizer one by one",
              "backends/param_groups.py", "attribute"),
        Entry("torch.optim.lr_scheduler.ChainedScheduler._schedulers",
              "as SequentialLR: the children of a chained scheduler are re-bound at a rebuild",
              "backends/param_groups.py", "attribute"),
    ],
    "fsdp2": [
        Entry("torch.distributed.tensor._utils.compute_local_shape_and_global_offset",
              "where this rank's shard of a rebuilt DTensor starts (uneven Shard(0) splits); no public equivalent",
              "backends/fsdp2_backend.py"),
        Entry("torch.distributed.fsdp.fully_shard", "the default parallelize_fn (public since 2.6, was _composable)",
              "backends/fsdp2_backend.py, gc_freeze.py"),
    ],
    "ddp": [
        Entry("torch.distributed.GradBucket.buffer",
              "the counted comm hook reads the flat bucket (hook API, documented as prototype)",
              "telemetry/comm.py"),
        Entry("torch.nn.parallel.DistributedDataParallel.register_comm_hook",
              "the counted all-reduce hook is installed on each rebuilt DDP wrapper",
              "backends/ddp_backend.py, telemetry/library.py"),
        Entry("<DDPStrategy>._ddp_comm_hook",
              "a Lightning user's DDP comm hook (DDP takes one): telemetry must not register its counter on top of it",
              "integrations/lightning.py", "attribute"),
    ],
    "deepspeed": [
        Entry("deepspeed.ops.__compatible_ops__",
              "marks the CPU shm op unavailable so init_distributed does not JIT-build it (50-90 s)",
              "backends/ds_runtime.py"),
        Entry("deepspeed.runtime.zero.partitioned_param_coordinator.PartitionedParameterCoordinator."
              "_PartitionedParameterCoordinator__params_to_release",
              "class-level lru_cache that keeps a released engine's params alive: cleared at each rebuild",
              "backends/ds_cleanup.py"),
        Entry("deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
              "the fp16 scaler whose running state (cur_scale, cur_iter, ...) is carried across a rebuild",
              "backends/ds_loss_scale.py"),
        Entry("deepspeed.checkpoint.constants.UNIVERSAL_CHECKPOINT_INFO",
              "a universal checkpoint is tagged so a resume with another world size loads it",
              "backends/ds_checkpoint.py"),
        Entry("deepspeed.comm.comm.cdb", "DeepSpeed's comm backend caches torch's gather/scatter functions: the "
              "comm counter makes it look them up again", "telemetry/comm.py", "attribute"),
        Entry("<comm backend>.all_gather_function", "as cdb (re-bound)", "telemetry/comm.py", "attribute"),
        Entry("<comm backend>.get_all_gather_function", "as cdb (re-bound)", "telemetry/comm.py", "attribute"),
        Entry("<comm backend>.reduce_scatter_function", "as cdb (re-bound)", "telemetry/comm.py", "attribute"),
        Entry("<comm backend>.get_reduce_scatter_function", "as cdb (re-bound)", "telemetry/comm.py", "attribute"),
        Entry("<engine>.module_forward_pre_hook", "engine hook handle removed at release (else it runs on the kept "
              "module and keeps the old engine alive)", "backends/ds_cleanup.py", "attribute"),
        Entry("<engine>.module_forward_post_hook", "as module_forward_pre_hook", "backends/ds_cleanup.py", "attribute"),
        Entry("<engine>.first_dataloader_check", "as module_forward_pre_hook (AutoTP engines only)",
              "backends/ds_cleanup.py", "attribute", optional=True),
        Entry("<engine>.torch_autocast_z0_gradscaler", "ZeRO-0 autocast GradScaler state carried across a rebuild",
              "backends/ds_loss_scale.py", "attribute"),
        Entry("<DynamicLossScaler>.cur_scale", "running loss scale carried across a rebuild",
              "backends/ds_loss_scale.py", "attribute"),
        Entry("<DynamicLossScaler>.cur_iter", "as cur_scale", "backends/ds_loss_scale.py", "attribute"),
        Entry("<DynamicLossScaler>.last_overflow_iter", "as cur_scale", "backends/ds_loss_scale.py", "attribute"),
        Entry("<DynamicLossScaler>.cur_hysteresis", "as cur_scale", "backends/ds_loss_scale.py", "attribute"),
        Entry("<ZeRO-1/2 optimizer>.custom_loss_scaler", "user-set loss scale carried across a rebuild",
              "backends/ds_loss_scale.py", "attribute"),
        Entry("<ZeRO-1/2 optimizer>.external_loss_scale", "as custom_loss_scaler", "backends/ds_loss_scale.py",
              "attribute"),
        Entry("<ZeRO-1/2 optimizer>._hp_optimizer_states_linked", "reset so the hp fragments re-link to the "
              "optimizer states written after a rebuild", "backends/ds_state.py",
              "attribute"),
        Entry("<ZeRO-1/2 optimizer>._lazy_init_hp_params_optimizer_state", "as _hp_optimizer_states_linked",
              "backends/ds_state.py", "attribute"),
        Entry("<ZeRO-1/2 param>._hp_mapping", "this rank's fragment of the fp32 master (lp_fragment_address, "
              "get_hp_fragment): the sharded SVD reads the master without a gather", "backends/ds_master_views.py",
              "attribute"),
        Entry("<ZeRO-3 optimizer>.fp32_partitioned_groups_flat", "the flat fp32 partitions whose optimizer state "
              "is written after a rebuild", "backends/ds_state.py", "attribute"),
        Entry("<ZeRO-3 optimizer>.sub_group_to_group_id", "maps a flat partition to its param group",
              "backends/ds_state.py", "attribute"),
        Entry("<ZeRO-3 optimizer>.get_local_fp32_param", "this rank's fp32 master partition (sharded SVD)",
              "backends/ds_master_views.py", "attribute"),
        Entry("<ZeRO-3 param>.ds_tensor", "this rank's partition of a ZeRO-3 parameter (gather-free reads, writes)",
              "backends/deepspeed_backend.py, backends/ds_state.py, backends/ds_master_views.py", "attribute"),
        Entry("<ZeRO-3 param>.ds_shape", "the full shape of a partitioned parameter",
              "backends/deepspeed_backend.py, backends/ds_state.py, backends/ds_master_views.py", "attribute"),
        Entry("<ZeRO-3 param>.ds_numel", "the full size of a partitioned parameter (also parameter counts)",
              "backends/deepspeed_backend.py, backends/ds_master_views.py, telemetry/params.py", "attribute"),
        Entry("<ZeRO-3 param>._z3_optimizer", "the optimizer holding the param's fp32 master",
              "backends/ds_master_views.py", "attribute"),
        Entry("<ZeRO-3 submodule>.pre_bwd_fn", "per-module autograd Function deleted at release (keeps the old "
              "engine alive otherwise)", "backends/ds_cleanup.py", "attribute"),
        Entry("<ZeRO-3 submodule>.post_bwd_fn", "as pre_bwd_fn", "backends/ds_cleanup.py", "attribute"),
    ],
    "fairscale": [
        Entry("<OSS>._optim_constructor", "the wrapped torch optimizer class, to build the OSS again over the rebuilt "
              "model's parameters", "backends/fairscale_backend.py", "attribute"),
        Entry("<OSS>._optim_defaults", "the wrapped optimizer's keyword arguments, for the rebuilt OSS",
              "backends/fairscale_backend.py", "attribute"),
        *[Entry(f"<ShardedDataParallel>.{attr}", why, "backends/fairscale_backend.py", "attribute") for attr, why in (
            ("_grad_hooks", "the old wrapper's hooks on the untouched parameters' AccumulateGrad nodes, removed "
                            "before the new wrapper is built (a surviving hook would reduce to the old owner)"),
            ("_grad_accs", "the AccumulateGrad nodes those hooks sit on, released with them"),
            ("_manual_reduce", "the old wrapper's manual-reduce closures, released with its hooks"),
            ("_buffer_max_size", "the user's reduce_buffer_size, carried to the rebuilt wrapper"),
            ("_use_buckets", "whether gradients are bucketed (then zero_grad must keep the bucket views)"),
            ("_enable_broadcast_buffers", "the user's broadcast_buffers, carried to the rebuilt wrapper"),
            ("_auto_refresh_trainable", "the user's auto_refresh_trainable, carried to the rebuilt wrapper"),
            ("_reduce_fp16", "the user's reduce_fp16, carried to the rebuilt wrapper"),
            ("_warn_on_trainable_params_changed", "the user's warning setting, carried to the rebuilt wrapper"),
            ("_process_group", "the user's process group, carried to the rebuilt wrapper"))],
    ],
}


def installed_versions(engine: str) -> str:
    """`torch X` or `torch X, deepspeed Y`: what a missing entry is reported against."""
    import torch

    text = f"torch {torch.__version__}"
    if engine in ("deepspeed", "fairscale"):
        try:
            package = importlib.import_module(engine)
            text += f", {engine} {package.__version__}"
        except ImportError:
            text += f", {engine} not installed"
    return text


def _torch_objects() -> dict[str, Any]:
    import torch

    weight = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([weight], lr=0.1)
    sched = torch.optim.lr_scheduler
    first, second = sched.LambdaLR(opt, lambda _: 1.0), sched.LambdaLR(opt, lambda _: 1.0)
    return {"torch.optim.lr_scheduler.SequentialLR": sched.SequentialLR(opt, [first, second], milestones=[1]),
            "torch.optim.lr_scheduler.ChainedScheduler": sched.ChainedScheduler([first, second])}


def _deepspeed_engine(stage: int) -> Any:
    """A 1-rank ZeRO-`stage` engine over two Linear(4, 4), one step taken (ZeRO-1 shares ZeRO-2's optimizer
    class, DeepSpeedZeroOptimizer, so stage 2 stands for both)."""
    import deepspeed
    import torch

    from dist_lowrank.backends.ds_runtime import prepare_deepspeed

    prepare_deepspeed()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    config = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    x = torch.ones(1, 4, device=engine.device)
    engine.backward(engine(x).sum())
    engine.step()
    return engine


def _built(make: Callable[[], Any]) -> Any:
    """`make()`, or the exception it raised (reported against the entries that needed the object)."""
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 - a changed constructor is itself an API change to report
        return exc


def _deepspeed_objects() -> dict[str, Any]:
    import sys

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    z2 = _deepspeed_engine(2)
    z3 = _deepspeed_engine(3)
    objects = {"<comm backend>": getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None), "<engine>": z2,
               "<DynamicLossScaler>": _built(lambda: DynamicLossScaler(
                   init_scale=2.0**16, scale_window=1000, min_scale=1.0, delayed_shift=2, consecutive_hysteresis=False)),
               "<ZeRO-1/2 optimizer>": z2.optimizer, "<ZeRO-1/2 param>": next(z2.module.parameters()),
               "<ZeRO-3 optimizer>": z3.optimizer, "<ZeRO-3 param>": next(z3.module.parameters()),
               "<ZeRO-3 submodule>": z3.module[0]}
    for engine in (z2, z3):
        engine.destroy()
    return objects


def _ddp_objects() -> dict[str, Any]:
    """Lightning's DDP strategy (built without a process group; the lightning extra)."""
    def strategy() -> Any:
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy()

    return {"<DDPStrategy>": _built(strategy)}


def _fairscale_objects() -> dict[str, Any]:
    """An OSS over one Linear and a ShardedDataParallel over it, on the caller's process group (one step taken)."""
    import torch
    from fairscale.nn.data_parallel import ShardedDataParallel
    from fairscale.optim import OSS

    from dist_lowrank.device import default_device

    model = torch.nn.Linear(4, 4).to(default_device())
    oss = OSS(model.parameters(), optim=torch.optim.SGD, lr=0.1)
    wrapped = ShardedDataParallel(model, oss, reduce_buffer_size=0)
    wrapped(torch.ones(1, 4, device=default_device())).sum().backward()
    oss.step()
    return {"<OSS>": oss, "<ShardedDataParallel>": wrapped}


OBJECT_BUILDERS: dict[str, Callable[[], dict[str, Any]]] = {"torch": _torch_objects,
                                                            "ddp": _ddp_objects,
                                                            "deepspeed": _deepspeed_objects,
                                                            "fairscale": _fairscale_objects}


def _missing(entry: Entry, objects: Optional[dict[str, Any]]) -> Optional[str]:
    """Why `entry` does not resolve; None when it does, or when it needs an object and none were built."""
    try:
        if entry.kind == "import":
            _import(entry.path)
            return None
        if objects is None:
            return None
        owner, _, attr = entry.path.rpartition(".")
        if owner in objects:
            obj = objects[owner]
        elif owner.startswith("<"):
            return f"no {owner} was built"
        else:
            obj = _import(owner)
        if obj is None:
            return f"{owner} is None"
        if isinstance(obj, Exception):
            return f"building {owner} failed: {type(obj).__name__}: {obj}"
        return None if hasattr(obj, attr) else f"{owner} has no attribute {attr}"
    except (ImportError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"


def check(engine: str, instances: bool = True, entries: Optional[list[Entry]] = None) -> list[str]:
    """One line per entry of `engine` that the installed versions lack (empty: all present).

    instances=False checks only what resolves without building objects (imports, class attributes);
    instances=True builds the smallest real objects (DeepSpeed needs a process group). `entries`
    replaces the registry's list (tests)."""
    if engine not in REGISTRY:
        raise KeyError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    builder = OBJECT_BUILDERS.get(engine)
    objects = builder() if instances and builder is not None else ({} if instances else None)
    versions = installed_versions(engine)
    lines = []
    for entry in REGISTRY[engine] if entries is None else entries:
        reason = _missing(entry, objects)
        if reason is not None and not entry.optional:
            lines.append(f"{engine}: private API {entry.path} (used in {entry.used_in}: {entry.why}) is missing "
                         f"on {versions}: {reason}")
    return lines
