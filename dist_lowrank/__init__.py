"""dist_lowrank: shard-aware low-rank training for DeepSpeed ZeRO, FSDP2 and DDP."""
from dist_lowrank.errors import CheckpointError, ConfigError, DistLowRankError, PlanMismatchError
from dist_lowrank.plan import Plan



def attach(backend, config, steps_per_epoch=None):
    """See dist_lowrank.api.attach (imported lazily: torch.distributed pieces load on first use)."""
    from dist_lowrank.api import attach as _attach

    return _attach(backend, config, steps_per_epoch)


__all__ = ["attach", "Plan", "ConfigError", "DistLowRankError", "PlanMismatchError", "CheckpointError"]
__version__ = "0.1.0"
