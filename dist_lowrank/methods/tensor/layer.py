"""Tensorized Linear and Embedding layers: the weight is never a parameter, only its cores (`formats`).

The cores are registered as `core_0`, `core_1`, ... (plain leaf names: the reshape pipeline addresses parameters
by leaf name, and a prune slices them with `Slice`); the spec (format, modes, ranks) is Python-side state listed in
`RESHAPE_ATTRS`, so a skeleton rebuild carries it over. Every constructor takes device= / dtype= and allocates
nothing but the cores, so a layer builds under torch.device("meta") (the pipeline's builders and checkpoint
layouts build empty layers there and let the engine fill them).

Fresh layers draw their cores i.i.d. N(0, s²) with s from `formats.init_std`, so the represented matrix has the
variance of the dense layer's default init (the method trains from scratch, as the paper does).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from dist_lowrank.methods.tensor import formats
from dist_lowrank.methods.tensor.formats import TensorSpec
from dist_lowrank.methods.tensor.prior import penalty as prior_penalty


class _Tensorized(nn.Module):
    """The cores of one TensorSpec and what every tensorized layer shares (layout, reset, repr)."""

    RESHAPE_ATTRS: tuple[str, ...] = ("spec",)
    LAYOUT_TYPE = "tensor"          # checkpoint manifests record {"type": "tensor", "format", modes, ranks, "kind"}
    KIND = ""
    # The Bayesian rank prior, set by the method before each forward: per rank group, w / (2 λ_k) (None: off).
    # The forward computes the prior's term from the cores it holds whole (also under FSDP2 / ZeRO-3), so the
    # method adds it to the loss and its gradient takes the engine's own path.
    prior_weights: Optional[list[torch.Tensor]] = None
    penalty: Optional[torch.Tensor] = None

    def _prior_term(self) -> None:
        """The prior's term of this forward, kept for the loss (None when off or without autograd)."""
        if self.prior_weights is None or not torch.is_grad_enabled():
            self.penalty = None
            return
        groups = formats.rank_groups(self.spec)
        self.penalty = prior_penalty(self.cores, [g.prior for g in groups], self.prior_weights)

    def _register_cores(self, spec: TensorSpec, device: Optional[torch.device], dtype: Optional[torch.dtype]
                        ) -> None:
        self.spec = spec
        for i, shape in enumerate(formats.core_shapes(spec)):
            self.register_parameter(f"core_{i}", nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))

    @property
    def cores(self) -> list[torch.Tensor]:
        return [getattr(self, f"core_{i}") for i in range(len(formats.core_shapes(self.spec)))]

    def layout(self) -> dict:
        """JSON-able (lists, not tuples: a layout read back from JSON must compare equal to the live one)."""
        s = self.spec
        return {"type": self.LAYOUT_TYPE, "format": s.format, "row_modes": list(s.row_modes),
                "col_modes": list(s.col_modes), "ranks": list(s.ranks), "kind": self.KIND}

    def _target_var(self) -> float:
        raise NotImplementedError

    def reset_cores(self, generator: Optional[torch.Generator] = None) -> None:
        """Cores ~ N(0, s²) with the matrix at the dense init's variance. A generator on another device than the
        cores draws there and copies (a CPU generator seeds the same values for CPU and CUDA layers)."""
        std = formats.init_std(self.spec, self._target_var())
        with torch.no_grad():
            for core in self.cores:
                if core.is_meta:
                    continue
                where = generator.device if generator is not None else core.device
                core.copy_(torch.randn(core.shape, generator=generator, device=where, dtype=core.dtype) * std)

    def _check_dims(self, rows: int, cols: int, what: str) -> None:
        if (self.spec.rows, self.spec.cols) != (rows, cols):
            raise ValueError(f"{type(self).__name__}: spec is {self.spec.rows}x{self.spec.cols} (row_modes "
                             f"{self.spec.row_modes}, col_modes {self.spec.col_modes}), the layer is {what}")

    def _dtype_device(self) -> dict:
        core = self.core_0
        return {"device": core.device, "dtype": core.dtype}

    def weight_matrix(self) -> torch.Tensor:
        """The represented matrix (tests, export)."""
        return formats.reconstruct(self.spec, self.cores)

    def _spec_repr(self) -> str:
        s = self.spec
        return f"format={s.format}, row_modes={s.row_modes}, col_modes={s.col_modes}, ranks={s.ranks}"


def spec_of_layout(entry: dict, kind: str) -> TensorSpec:
    """The TensorSpec of a layout entry (`layout()`, possibly read back from JSON) of the given kind."""
    if entry.get("type") != _Tensorized.LAYOUT_TYPE or entry.get("kind") != kind:
        raise ValueError(f"tensor layout: expected type 'tensor' of kind {kind!r}, got type "
                         f"{entry.get('type')!r} kind {entry.get('kind')!r}")
    return TensorSpec(entry["format"], tuple(entry["row_modes"]), tuple(entry["col_modes"]), tuple(entry["ranks"]))


class TensorizedLinear(_Tensorized):
    """y = x Wᵀ + b with W (out × in) held as tensor cores; `path` forces "dense" or "direct" (None: the cheaper
    by `formats.flops` for each call's batch)."""

    RESHAPE_ATTRS = ("spec", "path")
    KIND = "linear"

    def __init__(self, in_features: int, out_features: int, spec: TensorSpec, bias: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.path: Optional[str] = None
        self._register_cores(spec, device, dtype)
        self._check_dims(out_features, in_features, f"out_features x in_features = {out_features}x{in_features}")
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def _target_var(self) -> float:
        return 1.0 / (3.0 * self.in_features)  # nn.Linear: kaiming_uniform(a=√5) = U(±1/√in), Var = 1/(3·in)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Cores as `reset_cores`; the bias as nn.Linear's, U(±1/√in)."""
        self.reset_cores(generator)
        if self.bias is not None and not self.bias.is_meta:
            bound = 1.0 / math.sqrt(self.in_features)
            with torch.no_grad():
                where = generator.device if generator is not None else self.bias.device
                draw = torch.rand(self.bias.shape, generator=generator, device=where, dtype=self.bias.dtype)
                self.bias.copy_(draw * (2 * bound) - bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._prior_term()
        y = formats.apply(self.spec, self.cores, x, self.path)
        return y if self.bias is None else y + self.bias

    @classmethod
    def from_dense(cls, linear: nn.Linear, spec: TensorSpec, generator: Optional[torch.Generator] = None
                   ) -> "TensorizedLinear":
        """A layer of `spec` at the dense layer's shape, device and dtype: random cores at nn.Linear's init
        variance, the dense bias copied (the dense weight is not kept: training starts from scratch)."""
        layer = cls(linear.in_features, linear.out_features, spec, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.reset_cores(generator)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias.detach())
        return layer

    @classmethod
    def from_layout(cls, in_features: int, out_features: int, entry: dict, bias: bool,
                    device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None
                    ) -> "TensorizedLinear":
        """An empty layer of a checkpoint's layout entry (values come from the checkpoint)."""
        return cls(in_features, out_features, spec_of_layout(entry, cls.KIND), bias, device=device, dtype=dtype)

    def with_layout(self, entry: dict) -> "TensorizedLinear":
        """This layer if it already has the entry's spec, else an empty one of it (checkpoint.manifest)."""
        if spec_of_layout(entry, self.KIND) == self.spec:
            return self
        return self.from_layout(self.in_features, self.out_features, entry, self.bias is not None,
                                **self._dtype_device())

    def pruned_like(self, spec: TensorSpec, device: Optional[torch.device] = None,
                    dtype: Optional[torch.dtype] = None) -> "TensorizedLinear":
        """An empty layer of the same kind and shape with another spec (a prune's builder, under meta)."""
        layer = TensorizedLinear(self.in_features, self.out_features, spec, self.bias is not None, device=device,
                                 dtype=dtype)
        layer.path = self.path
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self._spec_repr()}, "
                f"bias={self.bias is not None}")


class TensorizedEmbedding(_Tensorized):
    """An embedding table (num_embeddings × embedding_dim) held as tensor cores; a lookup never builds the table."""

    KIND = "embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: TensorSpec,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self._register_cores(spec, device, dtype)
        self._check_dims(num_embeddings, embedding_dim,
                         f"num_embeddings x embedding_dim = {num_embeddings}x{embedding_dim}")
        self.reset_cores()

    def _target_var(self) -> float:
        return 1.0  # nn.Embedding: N(0, 1)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        self.reset_cores(generator)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        self._prior_term()
        return formats.lookup(self.spec, self.cores, index)

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, spec: TensorSpec, generator: Optional[torch.Generator] = None
                   ) -> "TensorizedEmbedding":
        """A layer of `spec` at the embedding's shape, device and dtype, random cores at N(0, 1)'s variance. No
        padding_idx (a fixed zero row is not a low-rank property) and no max_norm (rows are never materialised
        to renormalise)."""
        if embedding.padding_idx is not None:
            raise ValueError(f"TensorizedEmbedding: padding_idx ({embedding.padding_idx}) is not supported")
        if embedding.max_norm is not None:
            raise ValueError(f"TensorizedEmbedding: max_norm ({embedding.max_norm}) is not supported")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, spec, device=embedding.weight.device,
                    dtype=embedding.weight.dtype)
        layer.reset_cores(generator)
        return layer

    @classmethod
    def from_layout(cls, num_embeddings: int, embedding_dim: int, entry: dict,
                    device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None
                    ) -> "TensorizedEmbedding":
        return cls(num_embeddings, embedding_dim, spec_of_layout(entry, cls.KIND), device=device, dtype=dtype)

    def with_layout(self, entry: dict) -> "TensorizedEmbedding":
        if spec_of_layout(entry, self.KIND) == self.spec:
            return self
        return self.from_layout(self.num_embeddings, self.embedding_dim, entry, **self._dtype_device())

    def pruned_like(self, spec: TensorSpec, device: Optional[torch.device] = None,
                    dtype: Optional[torch.dtype] = None) -> "TensorizedEmbedding":
        return TensorizedEmbedding(self.num_embeddings, self.embedding_dim, spec, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._spec_repr()}"
