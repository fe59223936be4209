"""A training config file: a `run` section and a `lowrank` section, with command-line overrides."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from dist_lowrank.config import LowRankConfig, config_from_dict
from dist_lowrank.config_io import apply_overrides, dataclass_from_dict, read_mapping
from dist_lowrank.errors import ConfigError
from dist_lowrank.train.run_config import RunConfig

SECTIONS = ("run", "lowrank")


def load_train_config(source: Union[str, Path, dict], overrides: list[str] | None = None
                      ) -> tuple[RunConfig, LowRankConfig]:
    """Both sections validated strictly; overrides are dotted paths such as `lowrank.strategy=none`."""
    data = dict(source) if isinstance(source, dict) else read_mapping(source)
    data = apply_overrides(data, overrides or [])
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown top-level section; allowed: {', '.join(SECTIONS)}")
    run = dataclass_from_dict(RunConfig, data.get("run", {}), "run")
    lowrank = config_from_dict(data.get("lowrank", {}), "lowrank")
    return run, lowrank
