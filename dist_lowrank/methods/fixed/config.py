"""The `lowrank.fixed` section: the fixed-ratio baseline."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from dist_lowrank.config_io import Range, ge, gt
from dist_lowrank.config_io import help_field as _help


@dataclass
class FixedConfig:
    """Fixed-ratio baseline (Pufferfish): every layer at ratio * full rank after a warm-up."""

    ratio: float = _help("rank = ceil(ratio * min(m, n)), in (0, 1]", check=Range(0, 1, lo_open=True), default=0.25)
    warmup_steps: int = _help("full-rank steps before the switch (>= 0)", check=ge(0), default=0)
