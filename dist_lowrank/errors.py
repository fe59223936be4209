"""Named errors, so that a failure on any rank says what went wrong in one line."""


class DistLowRankError(RuntimeError):
    """Base class for every error this package raises on purpose."""


class ConfigError(DistLowRankError, ValueError):
    """A configuration key has a bad value; the message names the key path and what is allowed."""


class PlanMismatchError(DistLowRankError):
    """Ranks hold different plans; raised on every rank together (never a hang)."""


class RemoteRankError(DistLowRankError):
    """Another rank failed during a collective phase; the message names the rank and its cause."""


class CheckpointError(DistLowRankError):
    """A checkpoint or its manifest is missing, incomplete or does not match the model."""


class StragglerError(DistLowRankError):
    """A rank did not reach a collective phase in time; the message names the ranks that were late."""
