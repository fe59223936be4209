"""The lowrank section: every kind of bad input is one ConfigError line naming the key path."""
from __future__ import annotations

import json

import pytest
import yaml

from dist_lowrank.config import (LowRankConfig, changed_keys, config_digest, config_from_dict, config_to_dict,
                                 from_ds_config, load_config, schema_markdown)
from dist_lowrank.config_io import apply_overrides
from dist_lowrank.errors import ConfigError
from dist_lowrank.train.config_file import load_train_config

pytestmark = pytest.mark.unit

BAD = [
    ({"strategy": "svd"}, "lowrank.strategy", "'cuttlefish'"),
    ({"stratgy": "inrank"}, "lowrank.stratgy", "did you mean 'strategy'"),
    ({"cuttlefish": {"treshold": 0.1}}, "lowrank.cuttlefish.treshold", "did you mean 'threshold'"),
    ({"monitor": {"cadence_steps": "10"}}, "lowrank.monitor.cadence_steps", "allowed: int"),
    ({"monitor": {"steps": True}}, "lowrank.monitor.steps", "allowed: int"),
    ({"cuttlefish": {"threshold": "low"}}, "lowrank.cuttlefish.threshold", "allowed: float"),
    ({"cuttlefish": {"relax_threshold": 1}}, "lowrank.cuttlefish.relax_threshold", "allowed: bool"),
    ({"target_modules": 3}, "lowrank.target_modules", "list of str | str"),
    ({"target_modules": ["a", 2]}, "lowrank.target_modules", "allowed"),
    ({"inrank": [1]}, "lowrank.inrank", "mapping"),
    ({"cuttlefish": {"threshold": -1}}, "lowrank.cuttlefish.threshold", "a float > 0"),
    ({"inrank": {"tau": 1.0}}, "lowrank.inrank.tau", "(0, 1)"),
    ({"inrank": {"growth_factor": 1}}, "lowrank.inrank.growth_factor", "> 1"),
    ({"cuttlefish": {"floor_fraction": 2}}, "lowrank.cuttlefish.floor_fraction", "[0, 1]"),
    ({"monitor": {"cadence_steps": 0}}, "lowrank.monitor.cadence_steps", ">= 1"),
    ({"cuttlefish": {"min_switch_step": 10, "max_switch_step": 5}}, "lowrank.cuttlefish.max_switch_step", ">= min"),
    ({"target_modules": []}, "lowrank.target_modules", "empty"),
    ({"target_modules": "(("}, "lowrank.target_modules", "not a valid regex"),
]


@pytest.mark.parametrize("data,path,allowed", BAD)
def test_bad_values_name_key_and_allowed(data, path, allowed):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    message = str(info.value)
    assert message.startswith(path + ":") and allowed in message and "\n" not in message


def test_files_yaml_json_and_ds_config(tmp_path):
    section = {"strategy": "inrank", "inrank": {"tau": 0.8}, "target_modules": ["fc"]}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"lowrank": section}))
    (tmp_path / "b.json").write_text(json.dumps(section))
    ds = {"train_batch_size": 8, "zero_optimization": {"stage": 3}, "lowrank": section}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    expected = config_from_dict(section)
    for source in (tmp_path / "a.yaml", tmp_path / "b.json", tmp_path / "ds.json", ds):
        assert load_config(source) == expected
    assert from_ds_config(tmp_path / "ds.json") == expected
    assert from_ds_config({"train_batch_size": 8}) == LowRankConfig()
    assert config_from_dict(config_to_dict(expected)) == expected


@pytest.mark.parametrize("name,text,match", [
    ("bad.yaml", "lowrank:\n  strategy: [unclosed\n", "invalid YAML at line"),
    ("list.yaml", "- 1\n- 2\n", "top level is a list"),
    ("bad.json", "{'a': 1}", "invalid JSON at line 1"),
    ("conf.toml", "a = 1", "unknown config extension"),
])
def test_bad_files(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(tmp_path / name)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_digest_and_changed_keys():
    data = apply_overrides({"lowrank": {"strategy": "cuttlefish"}}, ["lowrank.monitor.cadence_steps=7",
                                                                     "lowrank.strategy=fixed"])
    cfg = config_from_dict(data["lowrank"])
    assert cfg.monitor.cadence_steps == 7 and cfg.strategy == "fixed"
    assert config_digest(cfg) == config_digest(config_from_dict(data["lowrank"]))
    assert changed_keys(LowRankConfig(), cfg) == ["monitor.cadence_steps", "strategy"]
    assert config_digest(cfg) != config_digest(LowRankConfig())
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="--override"):
            apply_overrides({}, [bad])


def test_train_config_sections(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("run: {steps: 5}\nlowrank: {strategy: none}\n")
    run, lowrank = load_train_config(path, ["run.batch_size=4"])
    assert (run.steps, run.batch_size, lowrank.strategy) == (5, 4, "none")
    path.write_text("run: {steps: 5}\nextra: {}\n")
    with pytest.raises(ConfigError, match="extra: unknown top-level section"):
        load_train_config(path)
    with pytest.raises(ConfigError, match="run.backend"):
        load_train_config({"run": {"backend": "horovod"}})


def test_config_doc_is_current():
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"
    assert doc.read_text() == schema_markdown(), "regenerate: python -m dist_lowrank.config > docs/CONFIG.md"
