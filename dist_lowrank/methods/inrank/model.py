"""Put a model into InRank form before training: targeted Linear layers become W0 + U·Vᵀ layers.

Call it where the model is built (before DDP / FSDP2 / DeepSpeed wrap it), like PEFT's
get_peft_model. The initial capacity follows the same geometric schedule as later growth.
"""
from __future__ import annotations

from torch import nn

from dist_lowrank.config import LowRankConfig
from dist_lowrank.errors import ConfigError
from dist_lowrank.layers import matrix_dims
from dist_lowrank.methods.inrank.layer import InRankLinear
from dist_lowrank.methods.inrank.rule import initial_capacity, trained_width
from dist_lowrank.surgery import replace_module
from dist_lowrank.targeting import select_targets


def to_inrank(model: nn.Module, cfg: LowRankConfig) -> nn.Module:
    """Replace every targeted nn.Linear by InRankLinear(init_rank, initial capacity); returns the model."""
    targets = select_targets(model, cfg.target_modules, cfg.exclude_modules)
    for index, (name, module) in enumerate(targets.items()):
        if type(module) is not nn.Linear:
            raise ConfigError(f"lowrank.target_modules: {name} is a {type(module).__name__}; "
                              "InRank supports nn.Linear layers")
        m, n = matrix_dims(module)
        capacity = initial_capacity(cfg.inrank, m, n)
        rank = min(trained_width(cfg.inrank, cfg.inrank.init_rank, m, n), capacity)  # r + buffer columns
        replace_module(model, name, InRankLinear.from_dense(module, rank, capacity, cfg.inrank.w0_mode,
                                                            seed=layer_seed(cfg.seed, index)))
    return model


def layer_seed(seed: int, index: int) -> int:
    """The init seed of the index-th InRank layer: distinct per layer and per `lowrank.seed`."""
    return int(seed) * 1_000_003 + index


def inrank_layers(model: nn.Module) -> dict[str, InRankLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, InRankLinear)}
