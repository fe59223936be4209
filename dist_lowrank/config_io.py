"""Strict loading of dataclass config schemas from dicts, YAML, JSON and DeepSpeed configs.

Generic over any dataclass schema (the `lowrank` section, the `run` section): every key is checked
against the schema's type hints and its allowed range, and any problem is one ConfigError line naming
the key path, the bad value and what is allowed. A field declares its range next to its default, in
its metadata (`"check"`: a `Range` or `OneOf`); `RANGES` below is the fallback for schemas that do not.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dist_lowrank.errors import ConfigError

NoneType = type(None)


# ---- allowed ranges ------------------------------------------------------------------------------
def _num(x: float) -> str:
    return f"{x:g}"


@dataclasses.dataclass(frozen=True)
class Range:
    """A numeric interval; open ends excluded. `describe` is what error messages and docs show."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, v: Any) -> bool:
        if self.lo is not None and not (v > self.lo if self.lo_open else v >= self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return (f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}"
                    f"{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"


def help_field(text: str, check: "typing.Optional[Range]" = None, **kwargs):
    """A dataclass field whose metadata carries the key's help text and allowed range (errors and docs)."""
    return dataclasses.field(metadata={"help": text, "check": check}, **kwargs)


@dataclasses.dataclass(frozen=True)
class OneOf:
    """A fixed set of allowed values (for int choices such as a ZeRO stage)."""

    values: tuple

    def ok(self, v: Any) -> bool:
        return v in self.values

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


def ge(lo: float) -> Range:
    return Range(lo=lo)


def gt(lo: float) -> Range:
    return Range(lo=lo, lo_open=True)


# Fallback for schemas whose fields carry no "check" metadata: key path (or dotted suffix) -> check.
RANGES: dict[str, Range | OneOf] = {
    "run.zero_stage": OneOf((1, 2, 3)),
    "run.world_size": ge(1),
    "run.steps": ge(1),
    "run.batch_size": ge(1),
    "run.lr": gt(0),
    "run.weight_decay": ge(0),
    "run.eval_every": ge(0),
    "run.eval_samples": ge(0),
    "run.log_every": ge(1),
    "run.checkpoint_every": ge(0),
    "run.keep_checkpoints": ge(0),
    "run.width": ge(1),
    "run.hidden": ge(1),
    "run.limit_train": ge(1),
}


def _field_check(f: dataclasses.Field, path: str) -> Range | OneOf | None:
    check = f.metadata.get("check")
    if check is not None:
        return check
    for suffix, table_check in RANGES.items():
        if path == suffix or path.endswith("." + suffix):
            return table_check
    return None


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) is Union and NoneType in typing.get_args(tp)


def _kind(tp: Any) -> str:
    """'an int' / 'a float' for the number type inside `tp` (Optional unwrapped)."""
    options = typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)
    if float in options:
        return "a float"
    if int in options:
        return "an int"
    return "a value"


def allowed_text(tp: Any, check: Range | OneOf | None) -> str:
    """What a field allows, as shown after 'allowed:' in messages and in docs/CONFIG.md."""
    if check is None:
        return _type_name(tp)
    text = f"{_kind(tp)} {check.describe()}" if isinstance(check, Range) else check.describe()
    return text + (" or null" if _allows_none(tp) else "")


# ---- type checking -------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is NoneType:
        return "null"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any, limit: int = 60) -> str:
    """A value as it appears in a one-line message (long values shortened)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Value checked (and int→float widened) against type `tp`, or ConfigError."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: got {_show(value)}; allowed: a mapping of {tp.__name__} keys")
        return _build(tp, value, path)
    if origin is Union:
        deeper = None
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, path)
            except ConfigError as exc:
                # An error inside an element (e.g. "path[1]: ...") says more than "no option matched".
                if not str(exc).startswith(path + ":"):
                    deeper = exc
        if deeper is not None:
            raise deeper
        raise ConfigError(f"{path}: got {_show(value)}; allowed: {_type_name(tp)}")
    if origin is Literal:
        options = typing.get_args(tp)
        if not isinstance(value, bool) and value in options:
            return value
        close = difflib.get_close_matches(value, [o for o in options if isinstance(o, str)], n=1) \
            if isinstance(value, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}: got {_show(value)}{hint}; allowed: {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: got {_show(value)}; allowed: {_type_name(tp)}")
        inner = typing.get_args(tp)[0]
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is NoneType:
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
            if not math.isfinite(value):
                raise ConfigError(f"{path}: got {_show(value)}; allowed: a finite float")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{path}: unsupported schema type {tp!r}")
    raise ConfigError(f"{path}: got {_show(value)} ({type(value).__name__}); allowed: {_type_name(tp)}")


def _build(cls: type, data: Mapping, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}.{key}: unknown key{hint}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key, raw = f"{path}.{name}", data[name]
        value = _coerce(raw, hints[name], key)
        check = _field_check(f, key)
        if check is not None and value is not None and not check.ok(value):
            raise ConfigError(f"{key}: got {_show(raw)}; allowed: {allowed_text(hints[name], check)}")
        kwargs[name] = value
    return cls(**kwargs)


def dataclass_from_dict(cls: type, data: Any, path: str) -> Any:
    """Build schema `cls` from a mapping, strictly; `path` is the key path used in messages."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: got {type(data).__name__}; allowed: a mapping")
    return _build(cls, data, path)


def dataclass_to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


# ---- files ---------------------------------------------------------------------------------------
class StrictYamlLoader(yaml.SafeLoader):
    """safe_load, but a duplicated key is an error (not a silent overwrite) and `1e-3` is a float.

    YAML 1.1 reads `1e-3` (no dot) as a string; people write learning rates and thresholds that way.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        self.flatten_mapping(node)
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: the base constructor reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


StrictYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=StrictYamlLoader)  # noqa: S506 - a SafeLoader subclass


class _DuplicateJsonKey(Exception):
    pass


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateJsonKey(key)
        out[key] = value
    return out


def read_mapping(path: str | Path) -> dict:
    """A YAML or JSON file's top-level mapping, or one ConfigError line naming the file."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{p}: unknown config extension {suffix or '(none)'!r}; allowed: .yaml, .yml, .json")
    if not p.exists():
        raise ConfigError(f"{p}: file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: cannot read (not UTF-8 text)") from None
    try:
        data = json.loads(text, object_pairs_hook=_json_pairs) if suffix == ".json" else load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p}: invalid YAML{where}: {problem}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except _DuplicateJsonKey as exc:
        raise ConfigError(f"{p}: invalid JSON: duplicate key {exc.args[0]!r}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level is a {type(data).__name__}; allowed: a mapping")
    return data


# ---- overrides, digest, diff ---------------------------------------------------------------------
def apply_overrides(data: Mapping, overrides: list[str] | None) -> dict:
    """Dotted `key=value` overrides (value parsed as YAML) applied to a deep copy of a nested mapping."""
    out = copy.deepcopy(dict(data))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or any(not part.strip() for part in parts):
            raise ConfigError(f"--override {item!r}: expected dotted.key=value")
        parts = [part.strip() for part in parts]
        try:
            value = load_yaml(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "parse error"
            raise ConfigError(f"--override {item!r}: value is not valid YAML ({problem})") from None
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:  # an empty YAML section (`monitor:`) takes overrides like a missing one
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--override {item!r}: {where} is {_show(child)}, not a section")
            node = child
        node[parts[-1]] = value
    return out


def canonical_json(obj: Any) -> str:
    return json.dumps(dataclass_to_dict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=True,
                      separators=(",", ":"))


def read_json_object(path: Path, error: type[Exception], missing: str, label: str = "") -> dict:
    """The JSON object in `path`, or one `error` line "<label><path>: <what is wrong>" (missing, not JSON, not an
    object): a checkpoint manifest and a speed table fail the same way."""
    if not path.is_file():
        raise error(f"{label}{path}: {missing}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{label}{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise error(f"{label}{path}: expected a JSON object")
    return data


def digest(obj: Any) -> str:
    """SHA-256 of the canonical JSON of a config (detects a changed config on resume)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted key paths whose values differ between two configs (dataclasses or dicts), sorted."""
    da = dataclass_to_dict(a) if dataclasses.is_dataclass(a) else a
    db = dataclass_to_dict(b) if dataclasses.is_dataclass(b) else b
    out: list[str] = []
    for key in sorted(set(da) | set(db), key=str):
        path = f"{prefix}{key}"
        va, vb = da.get(key), db.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(changed_keys(va, vb, path + "."))
        elif va != vb or (key in da) != (key in db):
            out.append(path)
    return out


def validate_regex(path: str, pattern: Any) -> None:
    if isinstance(pattern, str):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{path}: {pattern!r} is not a valid regex ({exc})") from None


# ---- documentation -------------------------------------------------------------------------------
def schema_rows(cls: type, path: str) -> list[tuple[str, str, str, str, str]]:
    """(key path, type, default, allowed, help) for every key of a schema, nested sections expanded."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{path}.{f.name}"
        if dataclasses.is_dataclass(tp):
            rows.extend(schema_rows(tp, key))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        check = _field_check(f, key)
        rows.append((key, _type_name(tp), json.dumps(default), allowed_text(tp, check) if check else "",
                     f.metadata.get("help", "")))
    return rows
