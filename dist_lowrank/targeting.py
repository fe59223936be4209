"""Which layers to factorize, PEFT-style: a list is a suffix match on module names, a string a regex.

Candidates are Linear, Conv2d (groups=1) and HF Conv1D layers that are not already part of a
factorized layer (the `first`/`second` children of a LowRankLinear are not targets themselves).
"""
from __future__ import annotations

import re
from typing import Optional, Union

from torch import nn

from dist_lowrank.errors import ConfigError
from dist_lowrank.layers import FACTORIZED_TYPES, is_factorizable

Patterns = Union[list[str], tuple[str, ...], str, None]
CANDIDATES = "factorizable layer (Linear, Conv2d with groups=1, HF Conv1D)"


def _matches(name: str, patterns: Patterns) -> bool:
    """PEFT rule: str → re.fullmatch; list → name == s or name ends with "." + s for some entry s."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _check_regex(pattern: str, key: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{key}: {pattern!r} is not a valid regex ({exc})") from None


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of every factorizable layer outside an already factorized one, in module order."""
    inside: list[str] = []  # prefixes "name." of factorized layers seen so far (named_modules is pre-order)
    out = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, FACTORIZED_TYPES):
            inside.append(name + ".")
        elif is_factorizable(module):
            out[name] = module
    return out


def select_targets(model: nn.Module, target_modules: Patterns, exclude_modules: Patterns = None,
                   key: str = "lowrank.target_modules") -> dict[str, nn.Module]:
    """Ordered {name: module} (module order) of candidate layers matched by the targets and not excluded.

    Every list entry (or the regex) must match at least one candidate: a pattern that matches nothing is
    almost always a typo, so it is a ConfigError naming the pattern. Exclusions follow the same rules
    but may match nothing (a shared config can list layers some models lack).
    """
    if target_modules is None or len(target_modules) == 0:
        raise ConfigError(f"{key}: empty; allowed: a non-empty list of name suffixes or a regex")
    exclude_key = key.rsplit(".", 1)[0] + ".exclude_modules"
    if isinstance(exclude_modules, str):
        _check_regex(exclude_modules, exclude_key)
    candidates = candidate_layers(model)
    if isinstance(target_modules, str):
        _check_regex(target_modules, key)
        if not any(_matches(n, target_modules) for n in candidates):
            raise ConfigError(f"{key}: regex {target_modules!r} matches no {CANDIDATES}")
    else:
        for pattern in target_modules:
            if not any(_matches(n, [pattern]) for n in candidates):
                raise ConfigError(f"{key}: {pattern!r} matches no {CANDIDATES}")
    return {n: m for n, m in candidates.items()
            if _matches(n, target_modules) and not _matches(n, exclude_modules)}


def matching_names(names: list[str], patterns: Optional[Patterns]) -> list[str]:
    """The names among `names` that the patterns match (same rules as select_targets)."""
    return [n for n in names if _matches(n, patterns)]
