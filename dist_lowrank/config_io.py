"""Strict loading of dataclass config schemas from dicts, YAML, JSON and DeepSpeed configs.

Generic over any dataclass schema (the `lowrank` section, the `run` section): every key is checked
against the schema's type hints and the range table, and any problem is one ConfigError line naming
the key path, the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dist_lowrank.errors import ConfigError

# key path suffix -> (check, description of what is allowed)
RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "monitor.cadence_steps": (lambda v: v >= 1, "an int >= 1"),
    "monitor.cadence_epochs": (lambda v: v is None or v > 0, "a number > 0 or null"),
    "monitor.steps": (lambda v: v >= 1, "an int >= 1"),
    "cuttlefish.ema_window": (lambda v: v >= 1, "an int >= 1"),
    "cuttlefish.last_k": (lambda v: v >= 1, "an int >= 1"),
    "cuttlefish.threshold": (lambda v: v > 0, "a float > 0"),
    "cuttlefish.floor_fraction": (lambda v: 0 <= v <= 1, "a float in [0, 1]"),
    "cuttlefish.min_switch_step": (lambda v: v >= 0, "an int >= 0"),
    "cuttlefish.max_switch_step": (lambda v: v is None or v >= 0, "an int >= 0 or null"),
    "cuttlefish.frobenius_decay": (lambda v: v >= 0, "a float >= 0"),
    "inrank.init_rank": (lambda v: v >= 1, "an int >= 1"),
    "inrank.warmup": (lambda v: v >= 0, "an int >= 0"),
    "inrank.gap": (lambda v: v >= 1, "an int >= 1"),
    "inrank.tau": (lambda v: 0 < v < 1, "a float in (0, 1)"),
    "inrank.buffer": (lambda v: v >= 1, "an int >= 1"),
    "inrank.growth_factor": (lambda v: v > 1, "a float > 1"),
    "inrank.capacity_multiple": (lambda v: v >= 1, "an int >= 1"),
    "inrank.fix_after": (lambda v: v is None or v >= 0, "an int >= 0 or null"),
    "fixed.ratio": (lambda v: 0 < v <= 1, "a float in (0, 1]"),
    "fixed.warmup_steps": (lambda v: v >= 0, "an int >= 0"),
    "switch.profile_iters": (lambda v: v >= 1, "an int >= 1"),
    "switch.min_speedup": (lambda v: v > 0, "a float > 0"),
    "logging.log_every": (lambda v: v >= 1, "an int >= 1"),
    "lowrank.min_rank": (lambda v: v >= 1, "an int >= 1"),
    "run.zero_stage": (lambda v: v in (1, 2, 3), "1, 2 or 3"),
    "run.world_size": (lambda v: v >= 1, "an int >= 1"),
    "run.steps": (lambda v: v >= 1, "an int >= 1"),
    "run.batch_size": (lambda v: v >= 1, "an int >= 1"),
    "run.lr": (lambda v: v > 0, "a float > 0"),
    "run.weight_decay": (lambda v: v >= 0, "a float >= 0"),
    "run.eval_every": (lambda v: v >= 0, "an int >= 0"),
    "run.eval_samples": (lambda v: v >= 0, "an int >= 0"),
    "run.log_every": (lambda v: v >= 1, "an int >= 1"),
    "run.width": (lambda v: v >= 1, "an int >= 1"),
    "run.hidden": (lambda v: v >= 1, "an int >= 1"),
    "run.limit_train": (lambda v: v is None or v >= 1, "an int >= 1 or null"),
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Value checked (and int→float widened) against type `tp`, or ConfigError."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {value!r}; allowed: a mapping of {tp.__name__} keys")
        return _build(tp, value, path)
    if origin is Union:
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, path)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{path}: got {value!r}; allowed: {_type_name(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: got {value!r}; allowed: {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: got {value!r}; allowed: {_type_name(tp)}")
        inner = typing.get_args(tp)[0]
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{path}: unsupported schema type {tp!r}")
    raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}); allowed: {_type_name(tp)}")


def _check_range(path: str, value: Any) -> None:
    for suffix, (check, allowed) in RANGES.items():
        if path == suffix or path.endswith("." + suffix):
            if not check(value):
                raise ConfigError(f"{path}: got {value!r}; allowed: {allowed}")


def _build(cls: type, data: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}.{key}: unknown key{hint}; allowed: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            value = _coerce(data[name], hints[name], f"{path}.{name}")
            _check_range(f"{path}.{name}", value)
            kwargs[name] = value
    return cls(**kwargs)


def dataclass_from_dict(cls: type, data: Any, path: str) -> Any:
    """Build schema `cls` from a mapping, strictly; `path` is the key path used in messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: got {type(data).__name__}; allowed: a mapping")
    return _build(cls, data, path)


def dataclass_to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def read_mapping(path: str | Path) -> dict:
    """A YAML or JSON file's top-level mapping, or one ConfigError line naming the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: file not found")
    suffix = p.suffix.lower()
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from None
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{p}: unknown config extension {suffix!r}; allowed: .yaml, .yml, .json")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p}: invalid YAML{where}: {problem}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level is a {type(data).__name__}; allowed: a mapping")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Dotted `key=value` overrides (value parsed as YAML) applied to a nested mapping copy."""
    out = json.loads(json.dumps(data))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(f"--override {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--override {item!r}: value is not valid YAML") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def canonical_json(obj: Any) -> str:
    return json.dumps(dataclass_to_dict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=True,
                      separators=(",", ":"))


def digest(obj: Any) -> str:
    """SHA-256 of the canonical JSON of a config (detects a changed config on resume)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted key paths whose values differ between two configs (dataclasses or dicts)."""
    da = dataclass_to_dict(a) if dataclasses.is_dataclass(a) else a
    db = dataclass_to_dict(b) if dataclasses.is_dataclass(b) else b
    out: list[str] = []
    for key in sorted(set(da) | set(db)):
        path = f"{prefix}{key}"
        va, vb = da.get(key), db.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(changed_keys(va, vb, path + "."))
        elif va != vb:
            out.append(path)
    return out


def validate_regex(path: str, pattern: Any) -> None:
    if isinstance(pattern, str):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{path}: {pattern!r} is not a valid regex ({exc})") from None


def describe_schema(cls: type, path: str) -> list[tuple[str, str, str, str]]:
    """(key path, type, default, help) rows for every key of a schema, nested sections expanded."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{path}.{f.name}"
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_schema(tp, key))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        rows.append((key, _type_name(tp), json.dumps(default), f.metadata.get("help", "")))
    return rows
