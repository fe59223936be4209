"""dist_lowrank: shard-aware low-rank training for DeepSpeed ZeRO, FSDP2 and DDP."""
from dist_lowrank.errors import CheckpointError, ConfigError, DistLowRankError, PlanMismatchError
from dist_lowrank.plan import Plan

__all__ = ["Plan", "ConfigError", "DistLowRankError", "PlanMismatchError", "CheckpointError"]
__version__ = "0.1.0"
