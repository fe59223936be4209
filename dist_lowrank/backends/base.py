"""What every backend offers the controller: shard views for the monitor, and plan execution."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn



class Backend(ABC):
    """A data-parallel engine (DDP, FSDP2, DeepSpeed ZeRO-1/2/3, ...) that can change layer shapes.

    After `apply(change)` the attributes `model` and `optimizer` refer to the *new* objects; the old
    engine, its hooks and the old parameters are released.
    """

    name: str = "base"
    owns_gradients: bool = False  # True where gradients live in the engine's own buffers (ZeRO): penalties go in the loss
    shards_parameters: bool = False  # True where a rank holds only a piece of each parameter (FSDP2, ZeRO-3)
    shards_optimizer_state: bool = False  # True where a rank holds only a piece of the optimizer state (FSDP2, ZeRO)
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None  # an LR scheduler stepped with the optimizer (backends that own one set it)

    @abstractmethod
    def param_views(self, names: list[str]) -> list[Any]:
        """For each parameter name, a `ShardView` of the piece this rank holds, in the parameter's stored
        layout viewed as (dim 0 × the rest)."""

    def shard_views(self, names: list[str]) -> list[Any]:
        """For each targeted layer name, a view of its weight (named after the layer) for the monitor.
        HF Conv1D appears as its stored (in × out) matrix: the transpose, with the same stable rank."""
        views = self.param_views([f"{n}.weight" for n in names])
        for view, name in zip(views, names):
            view.name = name
        return views

    def apply(self, change: Any) -> dict[str, Any]:
        """Carry out a `reshape.ShapeChange` on every rank (collective) through the one pipeline; returns its
        measurements (seconds, parameters before/after, peak memory during the change)."""
        from dist_lowrank.reshape.pipeline import run

        return run(self, change)

    # -- primitives of the reshape pipeline (dist_lowrank.reshape.pipeline) ------------------------------
    # Every rank calls each of them, in the same order (they may be collective).
    @abstractmethod
    def gather(self, param: torch.Tensor) -> torch.Tensor:
        """The full tensor of a parameter of `unwrapped_model()` (its fp32 master where the engine keeps one)."""

    @abstractmethod
    def full_state(self, param: torch.Tensor) -> Optional[dict[str, Any]]:
        """The parameter's optimizer state as full tensors (Adam: exp_avg, exp_avg_sq, step), None before it has any."""

    def values_dtype(self, param: torch.Tensor) -> torch.dtype:
        """The dtype `gather` returns for `param` (the dtype factors are broadcast in)."""
        return param.dtype

    def write(self, param: torch.Tensor, value: torch.Tensor, state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Overwrite a parameter that keeps its shape with the full tensor `value` (the engine's working copy and
        its master where it keeps one) and, if given, its optimizer moments with the full tensors in `state`
        (keys of the optimizer's state; the step is left alone). For methods that move the weights themselves
        between optimizer steps (DLRT's integrator). Every rank calls it with the same full tensors."""
        raise NotImplementedError(f"{self.name}: this backend cannot write parameters in place")

    def backward_scale(self) -> float:
        """The factor the engine multiplied the loss by in the last backward (an fp16 loss scale; 1 elsewhere):
        what a method that keeps activations' gradients from the backward (DLRT's KLS) must divide by."""
        return 1.0

    def row_shard(self, param: torch.Tensor) -> Optional[tuple[torch.Tensor, int]]:
        """(this rank's rows of `param` as a (rows × rest) tensor, its first global row) where the engine splits
        every parameter into disjoint row blocks over the ranks (FSDP2 `Shard(0)`): a method may then compute
        with local rows and all-reduce small products instead of gathering. None elsewhere (replicas, ZeRO-3's
        flat partitions)."""
        return None

    def local_state(self, param: torch.Tensor) -> Optional[dict[str, torch.Tensor]]:
        """This rank's rows of the parameter's optimizer moments (with `row_shard`); None without state."""
        return None

    def write_rows(self, param: torch.Tensor, rows: torch.Tensor,
                   state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Overwrite this rank's rows (as `row_shard` returned them) and, if given, its rows of the moments."""
        raise NotImplementedError(f"{self.name}: parameters are not split into row blocks here")

    @abstractmethod
    def rebuild(self, change: Any, modules: dict[str, nn.Module], values: dict[str, torch.Tensor],
                states: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Carry out a `reshape.ShapeChange`: put `modules` (layer name -> the new module, built by the change, values
        not yet written) in place of the old layers, write `values` (full parameter name -> full tensor; every new
        parameter except `Keep` ones) and `states` (full name -> full optimizer state; absent = fresh), rebuild the
        engine / wrapper / optimizer with the change's param-group rules, release the old ones. Every untouched
        parameter keeps its value and optimizer state bit for bit. Returns engine-specific measurements (or {})."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass the way this engine wants it (DeepSpeed overrides: engine.backward)."""
        loss.backward()

    def step(self) -> None:
        """One optimizer step, gradient reset and scheduler step (DeepSpeed overrides: engine.step)."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    def unwrapped_model(self) -> nn.Module:
        """The user's module without wrappers (names as the user wrote them)."""
        return self.model

    # -- checkpoints (collective; the directory exists on every rank) -------------------------------
    def engine_meta(self) -> dict[str, Any]:
        """Engine bookkeeping a loader needs before building the engine (stored in the manifest)."""
        return {}

    @abstractmethod
    def save_state(self, directory: Path, manifest_json: str) -> None:
        """Write model + optimizer (+ scheduler) state in this engine's own format, with the manifest inside
        where the format has room."""

    @abstractmethod
    def load_state(self, directory: Path, engine_meta: dict[str, Any]) -> None:
        """Load what `save_state` wrote into an engine built with the manifest's shapes; `engine_meta` is
        what `engine_meta()` returned at save time."""

    @abstractmethod
    def export_fp32(self) -> Optional[dict[str, torch.Tensor]]:
        """Collective: the consolidated fp32 state dict (full tensors) on rank 0, None elsewhere."""
