"""Which layers to factorize, PEFT-style: a list is a suffix match on module names, a string a regex.

Candidates are Linear, Conv2d (groups=1) and HF Conv1D layers that are not already part of a
factorized layer (the `first`/`second` children of a LowRankLinear are not targets themselves).

Tied and shared weights (HF `tie_word_embeddings`: `lm_head.weight is transformer.wte.weight`; one
module reachable under two names; one Parameter set on two modules) are never factorized: replacing
one owner would cut the tie, and the other owner would keep training the dense weight alone. A pattern
that merely covers a tied layer (the default regex `.*`) skips it with the reason logged; a list entry
that names it (or a regex that matches nothing else) is a ConfigError naming what it is tied to.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Optional, Union

from torch import nn

from dist_lowrank.errors import ConfigError
from dist_lowrank.layers import is_factorizable

Patterns = Union[list[str], tuple[str, ...], str, None]
CANDIDATES = "factorizable layer (Linear, Conv2d with groups=1, HF Conv1D)"
log = logging.getLogger("dist_lowrank")


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
        if isinstance(getattr(module, "LAYOUT_TYPE", None), str):  # already shaped by a method (factorized, InRank)
            inside.append(name + ".")
        elif is_factorizable(module):
            out[name] = module
    return out


def tied_layers(model: nn.Module, layers: Optional[dict[str, nn.Module]] = None) -> dict[str, str]:
    """{layer name: what it is tied to} for the layers (default: every candidate) that share a parameter
    with another module, or that are one module object reachable under more than one name.

    Identity is what counts (`a.weight is b.weight`), read from `named_parameters(remove_duplicate=False)`,
    so it holds for HF ties, hand-made ties, ZeRO-3 (parameters partitioned in place) and FSDP2 (one
    sharded parameter set on every module that shared it).
    """
    layers = candidate_layers(model) if layers is None else layers
    param_names: dict[int, list[str]] = defaultdict(list)
    for pname, param in model.named_parameters(remove_duplicate=False):
        param_names[id(param)].append(pname)
    module_names: dict[int, list[str]] = defaultdict(list)
    for mname, module in model.named_modules(remove_duplicate=False):
        module_names[id(module)].append(mname)
    ties: dict[str, str] = {}
    for name, module in layers.items():
        aliases = [m for m in module_names[id(module)] if m != name]
        if aliases:
            ties[name] = f"the same module is also reachable as {', '.join(aliases)}"
            continue
        shared = []
        for leaf, param in module.named_parameters(remove_duplicate=False):
            others = [p for p in param_names[id(param)] if not p.startswith(name + ".")]
            if others:
                shared.append(f"{name}.{leaf} is {' and '.join(others)}")
        if shared:
            ties[name] = "; ".join(shared)
    return ties


def _tie_error(key: str, pattern: str, name: str, tie: str) -> ConfigError:
    return ConfigError(f"{key}: {pattern!r} names {name}, which is tied to another module ({tie}); a tied layer "
                       f"cannot be factorized apart (untie it, e.g. tie_word_embeddings=False, or drop it)")


def select_targets(model: nn.Module, target_modules: Patterns, exclude_modules: Patterns = None,
                   key: str = "lowrank.target_modules",
                   candidates: Optional[dict[str, nn.Module]] = None) -> dict[str, nn.Module]:
    """Ordered {name: module} (module order) of candidate layers matched by the targets and not excluded.

    Every list entry (or the regex) must match at least one candidate: a pattern that matches nothing is
    almost always a typo, so it is a ConfigError naming the pattern. Exclusions follow the same rules
    but may match nothing (a shared config can list layers some models lack). Tied layers (see
    `tied_layers`) are never returned: skipped with the reason logged when a regex covers them, a
    ConfigError when a list entry names one or the regex matches only tied layers.
    """
    if target_modules is None or len(target_modules) == 0:
        raise ConfigError(f"{key}: empty; allowed: a non-empty list of name suffixes or a regex")
    exclude_key = key.rsplit(".", 1)[0] + ".exclude_modules"
    if isinstance(exclude_modules, str):
        _check_regex(exclude_modules, exclude_key)
    candidates = candidate_layers(model) if candidates is None else candidates  # a method may widen the set
    if isinstance(target_modules, str):
        _check_regex(target_modules, key)
        if not any(_matches(n, target_modules) for n in candidates):
            raise ConfigError(f"{key}: regex {target_modules!r} matches no {CANDIDATES}")
    else:
        for pattern in target_modules:
            if not any(_matches(n, [pattern]) for n in candidates):
                raise ConfigError(f"{key}: {pattern!r} matches no {CANDIDATES}")
    selected = {n: m for n, m in candidates.items()
                if _matches(n, target_modules) and not _matches(n, exclude_modules)}
    ties = tied_layers(model, selected)
    if isinstance(target_modules, str):
        if ties and len(ties) == len(selected):
            name = next(iter(ties))
            raise _tie_error(key, target_modules, name, ties[name])
    else:
        for pattern in target_modules:
            named = [n for n in ties if _matches(n, [pattern])]
            if named:
                raise _tie_error(key, pattern, named[0], ties[named[0]])
    for name, tie in ties.items():
        log.info("%s: kept dense: tied weights (%s)", name, tie)
    return {n: m for n, m in selected.items() if n not in ties}


def matching_names(names: list[str], patterns: Optional[Patterns]) -> list[str]:
    """The names among `names` that the patterns match (same rules as select_targets)."""
    return [n for n in names if _matches(n, patterns)]
