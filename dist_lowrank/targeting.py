"""Which layers to factorize, PEFT-style: a list is a suffix match on module names, a string a regex."""
from __future__ import annotations

import re
from typing import Optional, Union

from torch import nn

from dist_lowrank.errors import ConfigError
from dist_lowrank.layers import is_factorizable

Patterns = Union[list[str], str, None]


def _matches(name: str, patterns: Patterns) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def select_targets(model: nn.Module, target_modules: Patterns, exclude_modules: Patterns = None,
                   key: str = "lowrank.target_modules") -> dict[str, nn.Module]:
    """Ordered {name: module} of factorizable layers matched by the targets and not excluded.

    Every list entry (or the regex) must match at least one candidate layer: a pattern that matches
    nothing is almost always a typo, so it is an error naming the pattern.
    """
    if target_modules is None or (not isinstance(target_modules, str) and len(target_modules) == 0) \
            or target_modules == "":
        raise ConfigError(f"{key}: empty; allowed: a non-empty list of name suffixes or a regex")
    candidates = {n: m for n, m in model.named_modules() if n and is_factorizable(m)}
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ConfigError(f"{key}: {target_modules!r} is not a valid regex ({exc})") from None
        if not any(_matches(n, target_modules) for n in candidates):
            raise ConfigError(f"{key}: regex {target_modules!r} matches no Linear/Conv2d/Conv1D layer")
    else:
        for pattern in target_modules:
            if not any(_matches(n, [pattern]) for n in candidates):
                raise ConfigError(f"{key}: {pattern!r} matches no Linear/Conv2d/Conv1D layer")
    return {n: m for n, m in candidates.items()
            if _matches(n, target_modules) and not _matches(n, exclude_modules)}


def matching_names(names: list[str], patterns: Optional[Patterns]) -> list[str]:
    """The names among `names` that the patterns match (same rules as select_targets)."""
    return [n for n in names if _matches(n, patterns)]
