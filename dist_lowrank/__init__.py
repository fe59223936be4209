"""dist_lowrank: shard-aware low-rank training for DeepSpeed ZeRO, FSDP2 and DDP."""
from dist_lowrank.errors import CheckpointError, ConfigError, DistLowRankError, PlanMismatchError
from dist_lowrank.plan import Plan



def attach(backend, config, steps_per_epoch=None):
    """See dist_lowrank.api.attach (imported lazily: torch.distributed pieces load on first use)."""
    from dist_lowrank.api import attach as _attach

    return _attach(backend, config, steps_per_epoch)


def save_lowrank(engine_or_backend, directory):
    """See dist_lowrank.pretrained.save_lowrank: weights + layout of a (switched) model, for inference."""
    from dist_lowrank.pretrained import save_lowrank as _save

    return _save(engine_or_backend, directory)


def load_lowrank(model_or_fn, directory, map_location="cpu"):
    """See dist_lowrank.pretrained.load_lowrank: the model with the saved layout and weights."""
    from dist_lowrank.pretrained import load_lowrank as _load

    return _load(model_or_fn, directory, map_location)


__all__ = ["attach", "save_lowrank", "load_lowrank", "Plan", "ConfigError", "DistLowRankError", "PlanMismatchError", "CheckpointError"]
__version__ = "0.1.0"
