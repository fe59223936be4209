"""A CPU stand-in for a GPU run: catches tensors of two devices meeting, and collectives on host tensors.

No GPU is here, yet the plugin must be right on CUDA/NCCL. `DeviceDiscipline` is a TorchFunctionMode that
gives every tensor storage a *virtual* device — "accel" (what would be cuda:LOCAL_RANK) or "host" — and
records every op whose tensor inputs carry different virtual devices, the way CUDA would refuse them:

- the plugin's device choices (`dist_lowrank.device.default_device` / `comm_device`) answer cuda:LOCAL_RANK,
  as under NCCL; a factory or `.to()` asked for a cuda device runs on the CPU and its result is "accel";
- `.device` of an "accel" tensor reads cuda:LOCAL_RANK in plugin and user code, so `torch.zeros(n,
  device=x.device)` is right and `torch.zeros(n)` (host) is caught when it meets x;
- inside the engines (DeepSpeed, torch.distributed / FSDP2 / DDP, torch.optim) the honest CPU device is what
  their accelerator is, so what they allocate is "accel"; `.cpu()` is always "host";
- a parameter's `.grad` carries the parameter's device; 0-dim host tensors may meet anything (as in CUDA);
  `copy_`, `.to` and `t[slice] = v` cross devices legally; a tensor made where the mode cannot see (C++:
  autograd's gradients, DDP buckets) has no virtual device and is not judged;
- every collective called through `torch.distributed` must get "accel" tensors (NCCL takes CUDA tensors only).

What it cannot see: ops autograd runs in backward (it sees their results through `.grad`), and anything
C++ allocates. It is a check for the plugin's own code paths, not a CUDA emulator.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

ACCEL, HOST = "accel", "host"
_THIS = os.path.abspath(__file__)
_ENGINE_PARTS = ("/deepspeed/", "/torch/distributed/", "/torch/optim/", "/torch/nn/parallel/", "/fairscale/")
_NEUTRAL_PARTS = ("/torch/", "/transformers/", "/contextlib.py", "/functools.py", "/typing.py")
_FACTORIES = {"zeros", "ones", "empty", "full", "randn", "rand", "randint", "randperm", "arange", "linspace",
              "eye", "tensor", "as_tensor", "empty_strided", "zeros_like", "ones_like", "empty_like", "full_like",
              "randn_like", "rand_like", "from_numpy", "scalar_tensor", "normal"}
_CROSSING = {"copy_", "to", "cpu", "cuda", "__get__", "__set__", "untyped_storage", "data_ptr", "is_floating_point",
             "dim", "size", "numel", "element_size", "stride", "storage_offset", "is_contiguous", "_is_view",
             "__getitem__", "__setitem__", "set_", "record_stream", "pin_memory", "__repr__", "__format__",
             "tolist", "item", "__bool__", "__float__", "__int__", "__index__", "__len__", "__hash__",
             "requires_grad_", "detach", "detach_", "_local_tensor", "register_hook", "__reduce_ex__",
             "_has_compatible_shallow_copy_type", "view_as", "reshape_as", "expand_as"}
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather_into_tensor", "all_gather", "reduce_scatter_tensor",
                "reduce_scatter", "all_to_all_single", "reduce", "gather", "scatter", "send", "recv", "isend",
                "irecv", "_all_gather_base", "_reduce_scatter_base")


@dataclass
class Violation:
    """One op (or collective) that would fail on a GPU: where, what, and the devices it met."""

    where: str
    op: str
    devices: tuple[str, ...]
    origin: str  # "plugin" (dist_lowrank, examples, tests, user code) or "engine"

    def __str__(self) -> str:
        return f"{self.where}: {self.op} met {'/'.join(self.devices)} ({self.origin} code)"


def _origin(depth: int = 2) -> tuple[str, str]:
    """("plugin" | "engine", file:line of the first frame that is not torch's plumbing)."""
    frame = sys._getframe(depth)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if os.path.abspath(name) == _THIS:
            frame = frame.f_back
            continue
        if any(part in name for part in _ENGINE_PARTS):
            return "engine", f"{name}:{frame.f_lineno}"
        if any(part in name for part in _NEUTRAL_PARTS):
            frame = frame.f_back
            continue
        return "plugin", f"{name}:{frame.f_lineno}"
    return "plugin", "?"


def _basic_index(index: Any) -> bool:
    """Ints, slices, None and Ellipsis only (no tensor or list index): setitem is then a plain copy."""
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice, type(None), type(Ellipsis))) and not isinstance(i, bool) for i in items)


def _device_arg(value: Any) -> Optional[torch.device]:
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError:
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    return None


class DeviceDiscipline(TorchFunctionMode):
    """Record device mismatches while active; see the module docstring. Use as a context manager."""

    def __init__(self, local_rank: Optional[int] = None) -> None:
        super().__init__()
        rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
        self.virtual = torch.device("cuda", rank)
        self.tags: dict[int, str] = {}
        self._alive: dict[int, Any] = {}
        self.violations: list[Violation] = []
        self.ops = 0
        self._patches: list[tuple[Any, str, Any]] = []
        self._lock = threading.Lock()

    # -- tags ------------------------------------------------------------------------------------
    @staticmethod
    def _ptr(t: torch.Tensor) -> int:
        local = getattr(t, "_local_tensor", None)  # DTensor: its local shard
        with torch._C.DisableTorchFunction():
            t = local if isinstance(local, torch.Tensor) else t
            t = getattr(t, "elem", t) if not isinstance(local, torch.Tensor) else t  # functional-collective wrappers
            try:
                if t.device.type != "cpu" or t.numel() == 0:
                    return 0
                return t.untyped_storage().data_ptr()
            except RuntimeError:  # a wrapper subclass without storage
                return 0

    def tag(self, t: torch.Tensor) -> Optional[str]:
        """The virtual device of `t`; None when unknown: no data (meta, empty) or made where the mode cannot
        see (C++: autograd's gradients, buckets). A ZeRO-3 parameter lives where its partition does."""
        ptr = self._ptr(t)
        if ptr == 0:
            part = getattr(t, "ds_tensor", None)
            return self.tag(part) if isinstance(part, torch.Tensor) else None
        return self.tags.get(ptr)

    def set_tag(self, t: Any, tag: str) -> None:
        for leaf in tree_flatten(t)[0]:
            if isinstance(leaf, torch.Tensor):
                ptr = self._ptr(leaf)
                if ptr:
                    self.tags[ptr] = tag
                    if ptr not in self._alive:  # a tagged storage is kept while the check runs: its address is
                        with torch._C.DisableTorchFunction():  # never reused by an untagged (C++-made) tensor
                            local = getattr(leaf, "_local_tensor", None)
                            self._alive[ptr] = (local if isinstance(local, torch.Tensor) else leaf).untyped_storage()

    def mark(self, *tensors: Any, tag: str = ACCEL) -> None:
        """Declare tensors (or modules: their parameters and buffers) to live on the accelerator."""
        for item in tensors:
            if isinstance(item, torch.nn.Module):
                self.mark(*item.parameters(), *item.buffers(), tag=tag)
            else:
                self.set_tag(item, tag)

    # -- the mode --------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        owner = getattr(getattr(func, "__self__", None), "__name__", "")
        self.ops += 1
        if name == "__get__" and owner == "device":
            real = func(*args, **kwargs)
            if real.type == "cpu" and self.tag(args[0]) == ACCEL and _origin()[0] == "plugin":
                return self.virtual
            return real
        if name == "__get__" and owner == "grad":
            grad = func(*args, **kwargs)
            if grad is not None and self.tag(args[0]) is not None:
                self.set_tag(grad, self.tag(args[0]))  # a gradient lives with its parameter
            return grad
        if name == "__set__" and owner == "grad" and isinstance(args[1], torch.Tensor):
            met = self._devices([args[0], args[1]])
            if len(met) > 1:
                origin, where = _origin()
                self.violations.append(Violation(where, ".grad =", tuple(sorted(met)), origin))
            return func(*args, **kwargs)
        if name == "__get__" and owner == "is_cuda":
            return self.tag(args[0]) == ACCEL and _origin()[0] == "plugin"
        if name == "_parse_to":  # Module.to's argument parser: the device it names is converted per tensor
            return func(*args, **kwargs)
        if name in ("to", "cuda", "cpu"):
            return self._convert(func, name, args, kwargs)
        target = self._strip_device(kwargs)
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if name in ("__getitem__", "__setitem__"):
            tensors = [args[0]] + ([args[2]] if name == "__setitem__" and isinstance(args[2], torch.Tensor) else [])
            if name == "__setitem__" and _basic_index(args[1]):
                tensors = []  # t[slice] = v is a copy_, legal across devices (CUDA too)
        out = func(*args, **kwargs)
        if name in _CROSSING and name not in ("__setitem__",):
            if name in ("__getitem__",):
                self.set_tag(out, self.tag(args[0]) or HOST)
            return out
        met = self._devices(tensors)
        if len(met) > 1:
            origin, where = _origin()
            self.violations.append(Violation(where, name or str(func), tuple(sorted(met)), origin))
            if os.environ.get("DEVICE_DISCIPLINE_TRACE"):  # debugging aid: the full stack of each violation
                import traceback

                traceback.print_stack()
        if name == "__setitem__":
            return out
        if target is not None:
            tag = ACCEL if target.type == "cuda" else self._host_or_engine()
        elif met:
            tag = ACCEL if ACCEL in met else HOST
        elif name in _FACTORIES or not tensors:
            tag = self._host_or_engine()
        else:
            tag = self._like(tensors)
        if tag is not None and not (tensors and out is tensors[0]):  # an in-place op keeps its tensor's device
            self.set_tag(out, tag)
        return out

    def _like(self, tensors: list[torch.Tensor]) -> Optional[str]:
        tags = [self.tag(t) for t in tensors]
        return ACCEL if ACCEL in tags else HOST if HOST in tags else None

    @staticmethod
    def _host_or_engine() -> str:
        """A tensor made without a device: the engines' CPU is their accelerator here; the plugin's is the host."""
        return ACCEL if _origin(1)[0] == "engine" else HOST

    def _strip_device(self, kwargs: dict) -> Optional[torch.device]:
        """A factory's device= argument; a cuda one is replaced by the CPU that really runs it."""
        if "device" not in kwargs or kwargs["device"] is None:
            return None
        device = _device_arg(kwargs["device"])
        if device is not None and device.type == "cuda":
            kwargs["device"] = torch.device("cpu")
        return device

    def _devices(self, tensors: list[torch.Tensor]) -> set[str]:
        """Virtual devices of tensors that must share one (0-dim host tensors may meet any device)."""
        met = set()
        for t in tensors:
            tag = self.tag(t)
            if tag is None or (tag == HOST and t.dim() == 0):
                continue
            met.add(tag)
        return met

    def _convert(self, func: Callable, name: str, args: tuple, kwargs: dict) -> Any:
        """`.to(device)`, `.cuda()`, `.cpu()`: a real CPU op, with the target's virtual device (a copy when
        the virtual device changes, as on a GPU)."""
        source = args[0]
        before = self.tag(source)
        if name == "cpu":
            target_tag = HOST
        elif name == "cuda":
            target_tag, args = ACCEL, (source,)
            func, kwargs = (lambda t: t), {}
        else:
            device, rest = None, list(args[1:])
            if "device" in kwargs:
                device = _device_arg(kwargs["device"])
                if device is not None and device.type == "cuda":
                    kwargs["device"] = torch.device("cpu")
            elif rest and (isinstance(rest[0], (torch.device, str)) or
                           (isinstance(rest[0], int) and not isinstance(rest[0], bool))):
                device = _device_arg(rest[0])
                if device is not None and device.type == "cuda":
                    rest[0] = torch.device("cpu")
            elif rest and isinstance(rest[0], torch.Tensor):
                device = self.virtual if self.tag(rest[0]) == ACCEL else torch.device("cpu")
            args = (source, *rest)
            if device is None:
                target_tag = before
            elif device.type == "cuda":
                target_tag = ACCEL
            elif device.type == "cpu":
                target_tag = self._host_or_engine()
            else:
                target_tag = None
        out = func(*args, **kwargs)
        if target_tag is None or not isinstance(out, torch.Tensor):
            return out
        if before is not None and target_tag != before and self._ptr(out) == self._ptr(source):
            with torch._C.DisableTorchFunction():
                out = out.clone()  # a real device change copies; here the CPU returned the same storage
        self.set_tag(out, target_tag)
        return out

    # -- collectives and the plugin's device choice -------------------------------------------------
    def _check_collective(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            host = [t for t in tensors if self.tag(t) == HOST]
            if host:
                origin, where = _origin()
                self.violations.append(Violation(where, f"dist.{fn.__name__}", (HOST,), origin))
                if os.environ.get("DEVICE_DISCIPLINE_TRACE"):
                    import traceback

                    traceback.print_stack()
            return fn(*args, **kwargs)
        return wrapper

    def _patch(self, owner: Any, attr: str, value: Any) -> None:
        self._patches.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    def __enter__(self):
        import dist_lowrank.backends.ddp_backend as ddp_mod  # imported first: its names are patched below
        import dist_lowrank.device as device_mod

        virtual = self.virtual
        originals = {device_mod.default_device: lambda: virtual, device_mod.comm_device: lambda: virtual}
        for mod_name, module in list(sys.modules.items()):
            if module is None or not (mod_name.startswith(("dist_lowrank", "examples", "tests"))):
                continue
            if module is sys.modules[__name__]:
                continue
            for attr, value in list(vars(module).items()):
                try:
                    replacement = originals.get(value) if callable(value) else None
                except TypeError:  # an unhashable callable
                    replacement = None
                if replacement is not None:
                    self._patch(module, attr, replacement)
        for name in _COLLECTIVES:
            if hasattr(dist, name):
                self._patch(dist, name, self._check_collective(getattr(dist, name)))
        # what a (simulated) GPU answers: stream sync and its RNG state (fork_rng saves and restores it)
        self._patch(torch.cuda, "synchronize", lambda *a, **k: None)
        self._patch(torch.cuda, "get_rng_state", lambda *a, **k: torch.zeros(0, dtype=torch.uint8))
        self._patch(torch.cuda, "set_rng_state", lambda *a, **k: None)
        self._patch(ddp_mod, "DistributedDataParallel", self._ddp(ddp_mod.DistributedDataParallel))
        return super().__enter__()

    def _ddp(self, cls: type) -> Callable:
        """DDP as on one GPU per rank: device_ids must name this rank's device (then dropped: CPU module)."""
        def build(module, *args, device_ids=None, **kwargs):
            if device_ids is not None and list(device_ids) != [self.virtual.index]:
                origin, where = _origin()
                self.violations.append(Violation(where, f"DDP(device_ids={device_ids})", (HOST,), origin))
            return cls(module, *args, **kwargs)
        return build

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        for owner, attr, value in reversed(self._patches):
            setattr(owner, attr, value)
        self._patches.clear()
        self._alive.clear()
        return result

    def report(self, limit: int = 20) -> list[str]:
        """Distinct violations as lines (first `limit`)."""
        seen: dict[str, None] = {}
        for v in self.violations:
            seen.setdefault(str(v), None)
        return list(seen)[:limit]
