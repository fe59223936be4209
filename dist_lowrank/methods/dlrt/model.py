"""Put a model into DLRT form before training: targeted Linear / HF Conv1D / Conv2d layers become U S Vᵀ layers.

Like InRank's to_inrank (and PEFT's get_peft_model): called where the model is built, before DDP / FSDP2 /
DeepSpeed wrap it. With start=scratch each layer starts from the truncated SVD of its own initial weight at
init_rank (Haar-random bases, the dense init's spectrum); the capacity is init_rank grown once."""
from __future__ import annotations

from torch import nn

from dist_lowrank.config import LowRankConfig
from dist_lowrank.errors import ConfigError
from dist_lowrank.layers import is_hf_conv1d, matrix_dims, weight_matrix
from dist_lowrank.methods.dlrt.layer import DLRTConv2d, DLRTLinear
from dist_lowrank.methods.dlrt.rule import capacity_for
from dist_lowrank.surgery import replace_module
from dist_lowrank.targeting import select_targets


def max_rank_of(cfg: LowRankConfig, m: int, n: int) -> int:
    """lowrank.dlrt.max_rank, or min(m, n) / 2 (the reference's bound: the augmented core is 2r wide)."""
    limit = cfg.dlrt.max_rank if cfg.dlrt.max_rank is not None else max(1, min(m, n) // 2)
    return max(1, min(limit, min(m, n)))


def dlrt_from_dense(module: nn.Module, cfg: LowRankConfig) -> DLRTLinear:
    """A DLRT layer with the dense layer's function truncated to init_rank (its bias copied)."""
    m, n = matrix_dims(module)
    top = max_rank_of(cfg, m, n)
    rank = max(min(cfg.dlrt.init_rank, top), min(cfg.dlrt.min_rank, top))
    capacity = capacity_for(rank, m, n, cfg.dlrt.growth_factor, cfg.dlrt.capacity_multiple, top)
    if isinstance(module, nn.Conv2d):
        return DLRTConv2d.from_conv(module, rank, capacity)
    layer = DLRTLinear.from_matrix(weight_matrix(module).detach(), module.bias, rank, capacity)
    return layer.to(dtype=module.weight.dtype)


def empty_dlrt_like(dense: nn.Module, rank: int, capacity: int, **kw) -> DLRTLinear:
    """An empty DLRT layer with the dense layer's geometry (Linear / HF Conv1D / Conv2d), no values read: what a
    switch builds (under the meta device) and a checkpoint of a switched run restores into."""
    m, n = matrix_dims(dense)
    bias = getattr(dense, "bias", None) is not None
    if isinstance(dense, nn.Conv2d):
        return DLRTConv2d(dense.in_channels, dense.out_channels, dense.kernel_size, rank, capacity, dense.stride,
                          dense.padding, dense.dilation, bias, **kw)
    return DLRTLinear(n, m, rank, capacity, bias, **kw)


def supported(module: nn.Module) -> bool:
    """Linear, HF Conv1D, or a Conv2d with groups 1 and numeric zero padding."""
    if isinstance(module, nn.Conv2d):  # isinstance: FSDP2 wraps a module into a subclass (FSDPLinear)
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def check_supported(name: str, module: nn.Module) -> None:
    if not supported(module):
        raise ConfigError(f"lowrank.target_modules: {name} is a {type(module).__name__}"
                          f"{' (grouped, padded by mode or by name)' if isinstance(module, nn.Conv2d) else ''}; "
                          "DLRT supports nn.Linear, transformers' Conv1D and nn.Conv2d (groups=1, zero padding)")


def to_dlrt(model: nn.Module, cfg: LowRankConfig) -> nn.Module:
    """Replace every targeted nn.Linear / HF Conv1D / Conv2d by its DLRT layer (start=scratch); returns the model."""
    for name, module in select_targets(model, cfg.target_modules, cfg.exclude_modules).items():
        check_supported(name, module)
        replace_module(model, name, dlrt_from_dense(module, cfg))
    return model


def dlrt_layers(model: nn.Module) -> dict[str, DLRTLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DLRTLinear)}
