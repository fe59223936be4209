"""The plan: what a method decides, what the coordinator agrees on (JSON digests), what the method then turns into a
`reshape.ShapeChange` for the engines. Methods never import backends and backends never import methods.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Plan:
    """A change of layer ranks decided at optimizer step `step`.

    kind: "switch" (dense -> factorized), "grow" (factor ranks grow; `capacities` may change),
    or "fix" (InRank's efficient variant: ranks frozen from here on).
    ranks: layer name -> new (active) rank. Layers absent from `ranks` are untouched.
    capacities: layer name -> allocated rank (only for kinds that allocate more than they use).
    reasons: layer name -> human-readable reason a candidate was kept dense or changed (logged).
    floors: layer name -> the lowest rank the strategy accepts for quality (a speed search may go down to it).
    factor_moments / lr_scale: how the new factors enter the optimizer ("zero" | "projected"; their lr
    relative to their layer's group) — the same for every backend.
    keep: layer name -> per rank group, the slots that stay (kinds that remove chosen slices, e.g. "prune").
    """

    kind: str
    step: int
    ranks: dict[str, int]
    capacities: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    floors: dict[str, int] = field(default_factory=dict)
    factor_moments: str = "zero"
    lr_scale: float = 1.0
    keep: dict[str, list[list[int]]] = field(default_factory=dict)

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, so equal plans give equal bytes on every rank."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data: dict[str, Any] = json.loads(text)
        return cls(**data)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON; compared across ranks by the coordinator."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()
