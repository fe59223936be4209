"""The `lowrank` configuration section: one schema, every key's default and help in one place.

The same schema is read from YAML, JSON, a dict, or the `"lowrank"` section of a DeepSpeed config
(DeepSpeed passes unknown top-level keys silently, so we validate our own section strictly).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from dist_lowrank.config_io import (changed_keys, dataclass_from_dict, dataclass_to_dict, describe_schema, digest,
                                    read_mapping, validate_regex)
from dist_lowrank.errors import ConfigError

__all__ = ["LowRankConfig", "MonitorConfig", "CuttlefishConfig", "InRankConfig", "FixedConfig", "SwitchConfig",
           "LoggingConfig", "config_from_dict", "config_to_dict", "load_config", "from_ds_config", "config_digest",
           "changed_keys", "schema_markdown"]


def _help(text: str, **kwargs):
    """A dataclass field whose metadata carries the key's help text (shown in errors and docs)."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class MonitorConfig:
    """How and when stable ranks are estimated."""

    cadence_steps: int = _help("estimate every N optimizer steps (>= 1)", default=50)
    cadence_epochs: Optional[float] = _help(
        "estimate every N epochs instead (needs steps_per_epoch); null = use cadence_steps", default=None
    )
    method: Literal["lanczos", "power", "exact"] = _help(
        "sigma_max estimator: Golub-Kahan-Lanczos (default), power iteration, or exact SVD",
        default="lanczos",
    )
    steps: int = _help("Krylov / power iterations per estimate (>= 1); Lanczos: 30 keeps the worst error on "
                       "random GPT-2-shaped weights under 1% (20: ~1.2%)", default=30)


@dataclass
class CuttlefishConfig:
    """Cuttlefish: switch when every tracked layer's stable rank has stopped moving."""

    ema_window: int = _help("EMA window w of the srank history (alpha = 2/(w+1))", default=15)
    last_k: int = _help("mean of the last k |d EMA| entries is compared with the threshold", default=11)
    threshold: float = _help("a layer is stable when that mean is below this (> 0)", default=0.1)
    relax_threshold: bool = _help("relax the threshold as fewer layers remain unstable (reference)", default=True)
    rank_rule: Literal["scaled", "raw"] = _help(
        "scaled: r = ceil(xi * srank) with xi = min(m,n)/srank(W_0); raw: r = ceil(srank)", default="scaled"
    )
    floor_fraction: float = _help("rank floor as a fraction of full rank, in [0, 1]", default=0.0)
    min_switch_step: int = _help("never switch before this optimizer step", default=0)
    max_switch_step: Optional[int] = _help("switch at this step at the latest, stable or not (null = never force)", default=None)
    frobenius_decay: float = _help("Frobenius decay lambda on factor pairs after the switch (>= 0)", default=0.0)


@dataclass
class InRankConfig:
    """InRank: grow factor ranks while the explained ratio of the update says more rank is needed."""

    init_rank: int = _help("starting rank of every factorized layer (>= 1)", default=8)
    warmup: int = _help("optimizer steps before the first growth check", default=50)
    gap: int = _help("optimizer steps between growth checks (>= 1)", default=50)
    tau: float = _help("explained-ratio threshold g(k) > tau, in (0, 1)", default=0.9)
    buffer: int = _help("search ranks in [r, r + buffer) (>= 1)", default=8)
    growth_factor: float = _help("capacity grows geometrically by this factor (> 1)", default=1.5)
    capacity_multiple: int = _help("capacities are rounded up to a multiple of this (>= 1)", default=8)
    w0_mode: Literal["frozen", "trained", "none"] = _help(
        "W = W0 + U V with W0 frozen or trained; 'none' = W = U V only (the released reference)", default="frozen"
    )
    fix_after: Optional[int] = _help("efficient InRank: fix ranks at this step (null = keep growing)", default=None)
    fold_on_fix: bool = _help("on fix, fold W0 + U V into a pure factorization by truncated SVD", default=False)


@dataclass
class FixedConfig:
    """Fixed-ratio baseline (Pufferfish): every layer at ratio * full rank after a warm-up."""

    ratio: float = _help("rank = ceil(ratio * min(m, n)), in (0, 1]", default=0.25)
    warmup_steps: int = _help("full-rank steps before the switch (>= 0)", default=0)


@dataclass
class SwitchConfig:
    """How the switch is carried out."""

    profile_layers: bool = _help("time each candidate dense vs factorized; keep dense where not faster", default=True)
    profile_iters: int = _help("forward+backward passes per candidate when profiling (>= 1)", default=3)
    min_speedup: float = _help("factorize only if dense_time / factorized_time >= this (> 0)", default=1.0)
    factor_moments: Literal["zero"] = _help(
        "optimizer moments of new factors: zero (old moments belong to another parameterization)", default="zero"
    )


@dataclass
class LoggingConfig:
    """Where the run's logs go."""

    tensorboard_dir: Optional[str] = _help("TensorBoard event directory (null = no TensorBoard)", default=None)
    log_every: int = _help("log scalars every N optimizer steps (>= 1)", default=10)


@dataclass
class LowRankConfig:
    """The whole `lowrank` section."""

    strategy: Literal["cuttlefish", "inrank", "fixed", "none"] = _help(
        "cuttlefish (automatic switch), inrank (rank growth), fixed (ratio baseline), none (full rank)",
        default="cuttlefish",
    )
    target_modules: Union[list[str], str] = _help(
        "layers to factorize: list = suffix match on module names, string = regex full match",
        default=".*",
    )
    exclude_modules: Union[list[str], str, None] = _help("layers never to factorize (same matching rules)", default=None)
    min_rank: int = _help("no layer gets a rank below this (>= 1)", default=1)
    seed: int = _help("seed for every random choice the plugin makes", default=0)
    monitor: MonitorConfig = _help("stable-rank monitor", default_factory=MonitorConfig)
    cuttlefish: CuttlefishConfig = _help("Cuttlefish strategy", default_factory=CuttlefishConfig)
    inrank: InRankConfig = _help("InRank strategy", default_factory=InRankConfig)
    fixed: FixedConfig = _help("fixed-ratio baseline", default_factory=FixedConfig)
    switch: SwitchConfig = _help("switch execution", default_factory=SwitchConfig)
    logging: LoggingConfig = _help("logging", default_factory=LoggingConfig)


# ---- loading (strict) ---------------------------------------------------------------------------
def config_from_dict(data: Any, path: str = "lowrank") -> LowRankConfig:
    """The `lowrank` section from a mapping; unknown keys, wrong types, bad ranges → ConfigError."""
    cfg = dataclass_from_dict(LowRankConfig, data, path)
    targets = cfg.target_modules
    if targets == "" or targets == []:
        raise ConfigError(f"{path}.target_modules: empty; allowed: a non-empty list of name suffixes or a regex")
    validate_regex(f"{path}.target_modules", targets)
    validate_regex(f"{path}.exclude_modules", cfg.exclude_modules)
    cut = cfg.cuttlefish
    if cut.max_switch_step is not None and cut.max_switch_step < cut.min_switch_step:
        raise ConfigError(f"{path}.cuttlefish.max_switch_step: got {cut.max_switch_step}; "
                          f"allowed: >= min_switch_step ({cut.min_switch_step}) or null")
    return cfg


def config_to_dict(cfg: LowRankConfig) -> dict:
    return dataclass_to_dict(cfg)


def _section(data: dict) -> dict:
    """A DeepSpeed-style config carries us under "lowrank"; a plain file is the section itself."""
    return data["lowrank"] if "lowrank" in data else data


def load_config(source: Union[str, Path, dict]) -> LowRankConfig:
    """From a dict, a YAML/JSON file, or a DeepSpeed config (dict or file) with a "lowrank" section."""
    if isinstance(source, dict):
        return config_from_dict(_section(source))
    return config_from_dict(_section(read_mapping(source)))


def from_ds_config(ds_config: Union[str, Path, dict]) -> LowRankConfig:
    """The "lowrank" section of a DeepSpeed config; no section means all defaults."""
    data = ds_config if isinstance(ds_config, dict) else read_mapping(ds_config)
    return config_from_dict(data.get("lowrank", {}))


def config_digest(cfg: LowRankConfig) -> str:
    return digest(cfg)


def schema_markdown() -> str:
    """docs/CONFIG.md: every key path, type, default and help of the `lowrank` section."""
    lines = ["# The `lowrank` configuration section", "",
             "Generated by `python -m dist_lowrank.config > docs/CONFIG.md`; do not edit by hand.", "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, text in describe_schema(LowRankConfig, "lowrank"):
        lines.append(f"| `{key}` | {tp.replace('|', '/')} | `{default}` | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(schema_markdown(), end="")
