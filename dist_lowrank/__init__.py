"""dist_lowrank: shard-aware low-rank training for DeepSpeed ZeRO, FSDP2 and DDP."""
from dist_lowrank.errors import CheckpointError, ConfigError, DistLowRankError, PlanMismatchError
from dist_lowrank.plan import Plan



def attach(backend, config, steps_per_epoch=None):
    """See dist_lowrank.api.attach (imported lazily: torch.distributed pieces load on first use)."""
    from dist_lowrank.api import attach as _attach

    return _attach(backend, config, steps_per_epoch)


def prepare_model(model, config):
    """See dist_lowrank.methods.prepare_model: the model in the configured method's form, before any engine wraps
    it (InRank: targeted Linear layers become W0 + U·Vᵀ; other methods: unchanged). `config`: a LowRankConfig,
    dict, path or ds_config with a "lowrank" section."""
    from dist_lowrank.config import LowRankConfig, load_config
    from dist_lowrank.methods import prepare_model as _prepare

    return _prepare(model, config if isinstance(config, LowRankConfig) else load_config(config))


def save_lowrank(engine_or_backend, directory):
    """See dist_lowrank.pretrained.save_lowrank: weights + layout of a (switched) model, for inference."""
    from dist_lowrank.pretrained import save_lowrank as _save

    return _save(engine_or_backend, directory)


def load_lowrank(model_or_fn, directory, map_location="cpu"):
    """See dist_lowrank.pretrained.load_lowrank: the model with the saved layout and weights."""
    from dist_lowrank.pretrained import load_lowrank as _load

    return _load(model_or_fn, directory, map_location)


__all__ = ["attach", "prepare_model", "save_lowrank", "load_lowrank", "Plan", "ConfigError", "DistLowRankError", "PlanMismatchError", "CheckpointError"]
__version__ = "0.1.0"
