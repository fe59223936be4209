"""Put a model into tensorized form before training: targeted Linear / Embedding layers become CP, Tucker, TT or
TT-matrix layers (`lowrank.tensor`), initialised to the dense layer's variance (the dense values are not kept: the
method trains from scratch, as the paper does). Called where the model is built, before an engine wraps it."""
from __future__ import annotations

from torch import nn

from dist_lowrank.config import LowRankConfig
from dist_lowrank.errors import ConfigError
from dist_lowrank.methods.tensor import formats
from dist_lowrank.methods.tensor.config import TensorConfig
from dist_lowrank.methods.tensor.layer import TensorizedEmbedding, TensorizedLinear
from dist_lowrank.surgery import replace_module
from dist_lowrank.targeting import candidate_layers, matching_names, select_targets

TENSOR_LAYERS = (TensorizedLinear, TensorizedEmbedding)


def tensor_candidates(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a tensor format can replace: nn.Linear and nn.Embedding (in module order)."""
    out = {n: m for n, m in candidate_layers(model).items() if isinstance(m, nn.Linear)}
    out.update({n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding)})
    names = [n for n, _ in model.named_modules()]
    return dict(sorted(out.items(), key=lambda item: names.index(item[0])))


def format_of(name: str, cfg: TensorConfig) -> str:
    """The layer's format: the first `layer_formats` entry whose suffix matches its name, else `format`."""
    for entry in cfg.layer_formats:
        suffix, sep, fmt = entry.rpartition("=")
        if not sep or fmt not in formats.FORMATS:
            raise ConfigError(f"lowrank.tensor.layer_formats: {entry!r}; allowed: 'name suffix=format' with format "
                              f"one of {', '.join(formats.FORMATS)}")
        if matching_names([name], [suffix]):
            return fmt
    return cfg.format


def spec_for(name: str, module: nn.Module, cfg: LowRankConfig) -> formats.TensorSpec:
    """The layer's format, modes and initial ranks; a bad mode list names the layer and the key."""
    rows, cols = ((module.num_embeddings, module.embedding_dim) if isinstance(module, nn.Embedding)
                  else (module.out_features, module.in_features))
    t = cfg.tensor
    try:
        return formats.make_spec(format_of(name, t), rows, cols, t.init_rank, row_modes=t.row_modes, col_modes=t.col_modes,
                                 n_modes=t.n_modes)
    except ValueError as exc:
        raise ConfigError(f"lowrank.tensor: {name} ({rows}x{cols}): {exc}") from None


def to_tensorized(model: nn.Module, cfg: LowRankConfig) -> nn.Module:
    """Replace every targeted Linear / Embedding by its tensorized layer; returns the model."""
    targets = select_targets(model, cfg.target_modules, cfg.exclude_modules, candidates=tensor_candidates(model))
    for name, module in targets.items():
        spec = spec_for(name, module, cfg)
        if isinstance(module, nn.Embedding):
            if module.padding_idx is not None:
                raise ConfigError(f"lowrank.target_modules: {name} is an Embedding with padding_idx; tensorized "
                                  "embeddings do not keep a fixed zero row")
            layer = TensorizedEmbedding.from_dense(module, spec)
        else:
            layer = TensorizedLinear.from_dense(module, spec)
        replace_module(model, name, layer.to(dtype=module.weight.dtype))
    return model


def tensor_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TENSOR_LAYERS)}
