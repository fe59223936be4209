"""What a decision rule is: a pure function of observed statistics to an optional Plan, with state (no torch.distributed, no engines)."""
from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import Any, Optional

from dist_lowrank.plan import Plan


class Strategy(ABC):
    """Decision logic only: no torch.distributed, no engines. Inputs are identical on every rank."""

    done: bool = False

    @abstractmethod
    def observe(self, step: int, sranks: dict[str, float]) -> Optional[Plan]:
        """Feed one stable-rank measurement (step 0 = the init measurement); maybe return a plan."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: a resumed strategy makes the same decisions."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


class NonFiniteFilter:
    """Drops NaN/Inf observations per layer, warning once per layer (a bad layer never poisons history)."""

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def __call__(self, sranks: dict[str, float]) -> dict[str, float]:
        clean = {}
        for name, value in sranks.items():
            if value is None or not math.isfinite(value):
                if name not in self.warned:
                    warnings.warn(f"{name}: non-finite stable rank; observation skipped", RuntimeWarning, stacklevel=3)
                    self.warned.add(name)
                continue
            clean[name] = float(value)
        return clean
