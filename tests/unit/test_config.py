"""The lowrank section: every kind of bad input is one ConfigError line naming the key path."""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

from dist_lowrank.config import (CuttlefishConfig, InRankConfig, LowRankConfig, apply_overrides, changed_keys,
                                 config_digest, config_from_dict, config_to_dict, describe_schema, from_ds_config,
                                 load_config)
from dist_lowrank.config_io import Range
from dist_lowrank.errors import ConfigError
from dist_lowrank.train.config_file import load_train_config

pytestmark = pytest.mark.unit


def raises_one_line(fn, *args, path: str, contains: str = "") -> str:
    """fn(*args) raises a one-line ConfigError that starts with `path:` and contains `contains`."""
    with pytest.raises(ConfigError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(path + ":"), message
    assert contains in message, message
    return message


BAD = [
    # unknown keys (top level, nested with a suggestion, nothing close)
    ({"stratgy": "inrank"}, "lowrank.stratgy", "did you mean 'strategy'"),
    ({"cuttlefish": {"treshold": 0.1}}, "lowrank.cuttlefish.treshold", "did you mean 'threshold'"),
    ({"monitor": {"zzz": 1}}, "lowrank.monitor.zzz", "allowed: cadence_steps, cadence_epochs, method, steps"),
    # wrong types
    ({"monitor": {"cadence_steps": "10"}}, "lowrank.monitor.cadence_steps", "got '10' (str); allowed: int"),
    ({"monitor": {"steps": True}}, "lowrank.monitor.steps", "got True (bool); allowed: int"),
    ({"monitor": {"steps": 10.0}}, "lowrank.monitor.steps", "allowed: int"),
    ({"cuttlefish": {"threshold": "low"}}, "lowrank.cuttlefish.threshold", "allowed: float"),
    ({"cuttlefish": {"threshold": False}}, "lowrank.cuttlefish.threshold", "allowed: float"),
    ({"cuttlefish": {"relax_threshold": 1}}, "lowrank.cuttlefish.relax_threshold", "allowed: bool"),
    ({"logging": {"tensorboard_dir": 5}}, "lowrank.logging.tensorboard_dir", "allowed: str | null"),
    ({"target_modules": 3}, "lowrank.target_modules", "allowed: list of str | str"),
    ({"target_modules": ["a", 2]}, "lowrank.target_modules[1]", "got 2 (int); allowed: str"),
    ({"exclude_modules": {"a": 1}}, "lowrank.exclude_modules", "allowed: list of str | str | null"),
    ({"strategy": "svd"}, "lowrank.strategy", "allowed: 'cuttlefish' | 'inrank' | 'dlrt' | 'tensor' | 'fixed' | 'none'"),
    ({"strategy": "Inrank"}, "lowrank.strategy", "did you mean 'inrank'"),
    ({"monitor": {"method": True}}, "lowrank.monitor.method", "'lanczos'"),
    ({"inrank": [1]}, "lowrank.inrank", "allowed: a mapping of InRankConfig keys"),
    ({"switch": None}, "lowrank.switch", "mapping"),
    # ranges
    ({"monitor": {"cadence_steps": 0}}, "lowrank.monitor.cadence_steps", "got 0; allowed: an int >= 1"),
    ({"inrank": {"tau": 1.0}}, "lowrank.inrank.tau", "allowed: a float in (0, 1)"),
    ({"inrank": {"growth_factor": 1}}, "lowrank.inrank.growth_factor", "allowed: a float > 1"),
    ({"inrank": {"fix_after": -1}}, "lowrank.inrank.fix_after", "allowed: an int >= 0 or null"),
    ({"cuttlefish": {"floor_fraction": 2}}, "lowrank.cuttlefish.floor_fraction", "allowed: a float in [0, 1]"),
    ({"fixed": {"ratio": 0}}, "lowrank.fixed.ratio", "allowed: a float in (0, 1]"),
    ({"min_rank": 0}, "lowrank.min_rank", "allowed: an int >= 1"),
    ({"cuttlefish": {"threshold": float("nan")}}, "lowrank.cuttlefish.threshold", "a finite float"),
    ({"switch": {"min_speedup": float("inf")}}, "lowrank.switch.min_speedup", "a finite float"),
    ({"cuttlefish": {"min_switch_step": 10, "max_switch_step": 5}}, "lowrank.cuttlefish.max_switch_step",
     "allowed: >= min_switch_step (10)"),
    ({"cuttlefish": {"search_above_saving": True}}, "lowrank.cuttlefish.search_above_saving",
     "needs lowrank.switch.profile_layers and lowrank.switch.rank_search"),
    # targets
    ({"target_modules": []}, "lowrank.target_modules", "empty"),
    ({"target_modules": ""}, "lowrank.target_modules", "empty"),
    ({"target_modules": ["fc", ""]}, "lowrank.target_modules[1]", "empty name suffix"),
    ({"target_modules": "(("}, "lowrank.target_modules", "not a valid regex"),
    ({"exclude_modules": "[a"}, "lowrank.exclude_modules", "not a valid regex"),
]


@pytest.mark.parametrize("data,path,contains", BAD)
def test_bad_values_name_key_and_allowed(data, path, contains):
    raises_one_line(config_from_dict, data, path=path, contains=contains)


def test_message_format_and_section_type():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"cuttlefish": {"threshold": -1}})
    assert str(info.value) == "lowrank.cuttlefish.threshold: got -1; allowed: a float > 0"
    raises_one_line(config_from_dict, [1, 2], path="lowrank", contains="allowed: a mapping")
    raises_one_line(config_from_dict, {"x": 1}, "ds.lowrank", path="ds.lowrank.x", contains="unknown key")
    long = raises_one_line(config_from_dict, {"target_modules": list(range(200))}, path="lowrank.target_modules[0]")
    assert len(long) < 200


def _range_fields():
    """(dotted key under lowrank, field type, Range) for every range declared in the schema."""
    out = []
    for section in dataclasses.fields(LowRankConfig):
        cls = typing.get_type_hints(LowRankConfig)[section.name]
        owner, prefix = (cls, [section.name]) if dataclasses.is_dataclass(cls) else (LowRankConfig, [])
        for f in dataclasses.fields(owner):
            check = f.metadata.get("check")
            if isinstance(check, Range) and (prefix or f.name == section.name):
                out.append((".".join(prefix + [f.name]), typing.get_type_hints(owner)[f.name], check))
    return out


def _nest(dotted: str, value) -> dict:
    *parents, leaf = dotted.split(".")
    data: dict = {leaf: value}
    for part in reversed(parents):
        data = {part: data}
    return data


RANGE_FIELDS = _range_fields()


def test_every_listed_range_is_declared():
    declared = {key for key, _, _ in RANGE_FIELDS}
    brief = {"monitor.cadence_steps", "monitor.steps", "cuttlefish.ema_window", "cuttlefish.last_k",
             "cuttlefish.threshold", "cuttlefish.floor_fraction", "cuttlefish.min_switch_step",
             "cuttlefish.frobenius_decay", "inrank.init_rank", "inrank.warmup", "inrank.gap", "inrank.tau",
             "inrank.buffer", "inrank.growth_factor", "inrank.capacity_multiple", "inrank.fix_after", "fixed.ratio",
             "fixed.warmup_steps", "switch.profile_iters", "switch.min_speedup", "logging.log_every", "min_rank"}
    assert brief <= declared, brief - declared


@pytest.mark.parametrize("key,tp,check", RANGE_FIELDS, ids=[k for k, _, _ in RANGE_FIELDS])
def test_ranges_enforced_at_the_boundary(key, tp, check):
    """Closed ends accepted, open ends and one step outside rejected, for every declared range."""
    step = 1 if int in (typing.get_args(tp) or (tp,)) else 0.5
    bad, good = [], []
    for end, is_open, sign in ((check.lo, check.lo_open, -1), (check.hi, check.hi_open, 1)):
        if end is None:
            continue
        (bad if is_open else good).append(end)
        bad.append(end + sign * step)
    for value in good:
        cfg = config_from_dict(_nest(key, value))
        owner = cfg
        for part in key.split("."):
            owner = getattr(owner, part)
        assert owner == value
    for value in bad:
        raises_one_line(config_from_dict, _nest(key, value), path=f"lowrank.{key}",
                        contains=f"got {value!r}; allowed: ")


# ---- files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,text,contains", [
    ("bad.yaml", "lowrank:\n  strategy: inrank\n  target_modules: [unclosed\n", "invalid YAML at line 4"),
    ("dup.yaml", "lowrank:\n  seed: 1\n  seed: 2\n", "invalid YAML at line 3, column 3: duplicate key 'seed'"),
    ("list.yaml", "- 1\n- 2\n", "top level is a list; allowed: a mapping"),
    ("scalar.yml", "just text\n", "top level is a str"),
    ("bad.json", "{\n 'a': 1}", "invalid JSON at line 2"),
    ("dup.json", '{"seed": 1, "seed": 2}', "duplicate key 'seed'"),
    ("conf.toml", "a = 1", "unknown config extension '.toml'"),
    ("conf", "a: 1", "unknown config extension '(none)'"),
])
def test_bad_files(tmp_path, name, text, contains):
    (tmp_path / name).write_text(text)
    raises_one_line(load_config, tmp_path / name, path=str(tmp_path / name), contains=contains)


def test_missing_or_unreadable_file(tmp_path):
    raises_one_line(load_config, tmp_path / "nope.yaml", path=str(tmp_path / "nope.yaml"), contains="file not found")
    (tmp_path / "dir.yaml").mkdir()
    raises_one_line(load_config, tmp_path / "dir.yaml", path=str(tmp_path / "dir.yaml"), contains="cannot read")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{")
    raises_one_line(from_ds_config, tmp_path / "bin.json", path=str(tmp_path / "bin.json"), contains="not UTF-8")


def test_validation_error_from_file_names_key_and_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "lowrank": {"inrank": {"tau": 2}}}))
    for fn in (load_config, from_ds_config):
        message = raises_one_line(fn, path, path="lowrank.inrank.tau", contains="a float in (0, 1)")
        assert message.endswith(f"(in {path})")


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    (tmp_path / "c.yaml").write_text("cuttlefish: {threshold: 1e-3, frobenius_decay: 5E-4}\ninrank: {tau: .95}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.cuttlefish.threshold, cfg.cuttlefish.frobenius_decay, cfg.inrank.tau) == (1e-3, 5e-4, 0.95)


# ---- round trips ----------------------------------------------------------------------------------
SECTION = {"strategy": "inrank", "target_modules": ["fc", "attn.c_attn"], "exclude_modules": "head",
           "monitor": {"cadence_steps": 7, "method": "power"}, "inrank": {"tau": 0.8, "fix_after": 100},
           "cuttlefish": {"threshold": 1}, "logging": {"tensorboard_dir": "tb"}}


def test_round_trips_yaml_json_and_dict(tmp_path):
    cfg = config_from_dict(SECTION)
    assert cfg != LowRankConfig() and cfg.cuttlefish.threshold == 1.0 and cfg.inrank.fix_after == 100
    full = config_to_dict(cfg)
    assert config_from_dict(full) == cfg
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(full))
    (tmp_path / "full.json").write_text(json.dumps(full))
    (tmp_path / "part.yml").write_text(yaml.safe_dump({"lowrank": SECTION}))
    for source in ("full.yaml", "full.json", "part.yml"):
        assert load_config(tmp_path / source) == cfg
    assert load_config(str(tmp_path / "full.yaml")) == cfg
    assert load_config(cfg) == cfg
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    assert load_config(tmp_path / "empty.yaml") == LowRankConfig()


def test_ds_config_section_and_other_keys_ignored(tmp_path):
    ds = {"train_batch_size": 8, "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"},
          "lowrank": SECTION}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    (tmp_path / "ds.yaml").write_text(yaml.safe_dump(ds))
    expected = config_from_dict(SECTION)
    for source in (ds, tmp_path / "ds.json", tmp_path / "ds.yaml"):
        assert load_config(source) == expected
        assert from_ds_config(source) == expected
    no_section = {"train_batch_size": 8}
    (tmp_path / "plain_ds.json").write_text(json.dumps(no_section))
    assert from_ds_config(no_section) == from_ds_config(tmp_path / "plain_ds.json") == LowRankConfig()
    assert from_ds_config({"lowrank": None}) == LowRankConfig()
    # load_config reads a file without "lowrank" as the section itself, so DeepSpeed keys are unknown there
    raises_one_line(load_config, no_section, path="lowrank.train_batch_size", contains="unknown key")


def test_code_built_config_is_revalidated():
    bad = LowRankConfig(inrank=InRankConfig(tau=1.5))
    raises_one_line(load_config, bad, path="lowrank.inrank.tau", contains="a float in (0, 1)")


# ---- overrides, digest, diff -------------------------------------------------------------------------
def test_overrides():
    base = {"strategy": "cuttlefish", "monitor": None, "target_modules": ["fc"]}
    data = apply_overrides(base, ["monitor.cadence_steps=10", "strategy=inrank", "inrank.tau = 0.7",
                                  "target_modules=[fc1, fc2]", "cuttlefish.max_switch_step=null",
                                  "logging.tensorboard_dir=runs/tb"])
    assert base == {"strategy": "cuttlefish", "monitor": None, "target_modules": ["fc"]}  # input untouched
    cfg = config_from_dict(data)
    assert (cfg.monitor.cadence_steps, cfg.strategy, cfg.inrank.tau) == (10, "inrank", 0.7)
    assert cfg.target_modules == ["fc1", "fc2"] and cfg.cuttlefish.max_switch_step is None
    assert cfg.logging.tensorboard_dir == "runs/tb"
    raises_one_line(config_from_dict, apply_overrides({}, ["monitor.steps=many"]), path="lowrank.monitor.steps")


@pytest.mark.parametrize("bad,contains", [
    ("novalue", "expected dotted.key=value"),
    ("=3", "expected dotted.key=value"),
    ("a..b=1", "expected dotted.key=value"),
    ("monitor.steps=[1", "value is not valid YAML"),
    ("strategy.x=1", "strategy is 'cuttlefish', not a section"),
])
def test_bad_overrides(bad, contains):
    raises_one_line(apply_overrides, {"strategy": "cuttlefish"}, [bad], path=f"--override {bad!r}",
                    contains=contains)


def test_digest_and_changed_keys():
    cfg = config_from_dict(SECTION)
    reordered = config_from_dict(dict(reversed(list(SECTION.items()))))
    assert config_digest(cfg) == config_digest(reordered) == config_digest(load_config(config_to_dict(cfg)))
    as_float = config_from_dict({**SECTION, "cuttlefish": {"threshold": 1.0}})
    assert config_digest(as_float) == config_digest(cfg)
    assert len(config_digest(cfg)) == 64 and changed_keys(cfg, reordered) == []
    assert config_digest(cfg) != config_digest(LowRankConfig())
    assert changed_keys(LowRankConfig(), cfg) == [
        "cuttlefish.threshold", "exclude_modules", "inrank.fix_after", "inrank.tau", "logging.tensorboard_dir",
        "monitor.cadence_steps", "monitor.method", "strategy", "target_modules"]
    one = LowRankConfig(cuttlefish=CuttlefishConfig(ema_window=3))
    assert changed_keys(LowRankConfig(), one) == ["cuttlefish.ema_window"]
    assert config_digest(one) != config_digest(LowRankConfig())


# ---- the run section shares the loader ----------------------------------------------------------------
def test_train_config_sections(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("run: {steps: 5}\nlowrank: {strategy: none}\n")
    run, lowrank = load_train_config(path, ["run.batch_size=4"])
    assert (run.steps, run.batch_size, lowrank.strategy) == (5, 4, "none")
    path.write_text("run: {steps: 5}\nextra: {}\n")
    raises_one_line(load_train_config, path, path="extra", contains="unknown top-level section")
    raises_one_line(load_train_config, {"run": {"backend": "horovod"}}, path="run.backend", contains="'ddp'")
    raises_one_line(load_train_config, {"run": {"zero_stage": 4}}, path="run.zero_stage",
                    contains="allowed: one of 1, 2, 3")
    raises_one_line(load_train_config, {"run": {"limit_train": 0}}, path="run.limit_train",
                    contains="allowed: an int >= 1 or null")


def test_config_doc_is_current():
    doc = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"
    assert doc.read_text() == describe_schema(), "docs/CONFIG.md is stale; regenerate: " \
                                                 "python -m dist_lowrank.config > docs/CONFIG.md"
    for key, _, _ in RANGE_FIELDS:
        assert f"`lowrank.{key}`" in doc.read_text()
