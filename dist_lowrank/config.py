"""The `lowrank` configuration section: one schema, every key's default and help in one place.

The same schema is read from YAML, JSON, a dict, or the `"lowrank"` section of a DeepSpeed config
(DeepSpeed passes unknown top-level keys silently, so we validate our own section strictly).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from dist_lowrank.config_io import help_field as _help
from dist_lowrank.config_io import (Range, apply_overrides, changed_keys, dataclass_from_dict, dataclass_to_dict,
                                    digest, ge, gt, read_mapping, schema_rows, validate_regex)
from dist_lowrank.errors import ConfigError
from dist_lowrank.methods.cuttlefish.config import CuttlefishConfig
from dist_lowrank.methods.fixed.config import FixedConfig
from dist_lowrank.methods.dlrt.config import DLRTConfig
from dist_lowrank.methods.inrank.config import InRankConfig
from dist_lowrank.methods.tensor.config import TensorConfig

__all__ = ["LowRankConfig", "MonitorConfig", "CuttlefishConfig", "InRankConfig", "DLRTConfig", "TensorConfig", "FixedConfig", "SwitchConfig",
           "LoggingConfig", "config_from_dict", "config_to_dict", "load_config", "from_ds_config", "config_digest",
           "changed_keys", "apply_overrides", "describe_schema", "schema_markdown"]


@dataclass
class MonitorConfig:
    """How and when stable ranks are estimated."""

    cadence_steps: int = _help("estimate every N optimizer steps (>= 1)", check=ge(1), default=50)
    cadence_epochs: Optional[float] = _help(
        "estimate every N epochs instead (needs steps_per_epoch); null = use cadence_steps", check=gt(0), default=None
    )
    method: Literal["lanczos", "power", "exact"] = _help(
        "sigma_max estimator: Golub-Kahan-Lanczos (default), power iteration, or exact SVD (replicated weights "
        "only: DDP, ZeRO-1/2, one process; refused on FSDP2 / ZeRO-3 shards, which are never gathered)",
        default="lanczos",
    )
    steps: int = _help("Krylov / power iterations per estimate (>= 1); Lanczos: 30 keeps the worst error on "
                       "random GPT-2-shaped weights under 1% (20: ~1.2%)", check=ge(1), default=30)
    rtol: float = _help("stop the Krylov steps early once every layer's sigma_max moved less than this (relative) "
                        "in one step, agreed by all ranks; 0 = always run `steps`",
                        check=Range(lo=0.0, hi=1.0, hi_open=True), default=1e-5)


@dataclass
class SwitchConfig:
    """How the switch is carried out."""

    profile_layers: bool = _help("time each candidate dense vs factorized; keep dense where not faster", default=True)
    profile_iters: int = _help("forward+backward passes per candidate when profiling (>= 1)", check=ge(1), default=3)
    min_speedup: float = _help("factorize only if dense_time / factorized_time >= this (> 0)", check=gt(0), default=1.0)
    rank_search: bool = _help(
        "with profile_layers: a layer not min_speedup faster at the rule's rank is timed at lower ranks, down to "
        "the strategy's quality floor (Cuttlefish: ceil(srank)), and takes the largest rank that meets the speed "
        "target (a per-layer Pareto choice); false = keep such a layer dense", default=False)
    speedup_scope: Literal["layer", "total"] = _help(
        "layer: min_speedup is a bar for each layer (one that misses it at every rank down to its floor stays "
        "dense); total: a target on the timed layers together (summed dense over summed factorized time), met by "
        "lowering ranks where that saves most time per rank given up (every layer faster than dense at some rank "
        "stays factorized; with rank_search every layer with a floor is searched)", default="layer")
    speed_table: Optional[str] = _help(
        "with profile_layers: a layer-time table measured beforehand on this device (tools/bench_speed_table.py) "
        "that the switch reads instead of timing live, so every run takes the same plan; shapes or ranks it does "
        "not cover are timed live (null = time everything live)", default=None)
    rank_multiple: int = _help(
        "round every rank the switch plans (and the floors a rank search goes down to) up to a multiple of this, "
        "where the layer still saves parameters there: matmul kernels run faster at aligned inner sizes (tensor "
        "cores; MKL on CPU: rank 48 1.27x faster than 47 at 256x256 here); 1 = ranks as the strategy gives them "
        "(>= 1)", check=ge(1), default=1)
    factor_moments: Literal["zero", "projected"] = _help(
        "optimizer state of new factors: zero = fresh (step 0, zero moments); projected = W's Adam moments "
        "projected onto the factors (exp_avg_A = M_W B^T, exp_avg_B = A^T M_W, second moments through the squared "
        "factors) with W's step count", default="zero")
    lr_scale: float = _help("learning rate of the new factors relative to the group their layer was in (> 0); "
                            "schedulers keep scaling it", check=gt(0), default=1.0)
    barrier_timeout_s: float = _help(
        "every rank must reach a reshard within this many seconds of the first; else the straggling ranks are "
        "named in an error on every rank (> 0)", check=gt(0), default=600.0)


@dataclass
class LoggingConfig:
    """Telemetry of a library run (`deepspeed_api.initialize`, `attach`): the same records as the CLI's."""

    out_dir: Optional[str] = _help(
        "run directory: events.jsonl, summary.json and the report (`dist-lowrank report DIR`), TensorBoard "
        "under DIR/tb; null = no run log", default=None)
    tensorboard_dir: Optional[str] = _help(
        "TensorBoard event directory (null = out_dir/tb; with out_dir null too: no TensorBoard)", default=None)
    log_every: int = _help("log a window of steps every N optimizer steps (>= 1)", check=ge(1), default=10)
    samples_per_step: Optional[int] = _help(
        "samples per optimizer step over all ranks, for samples/s (null = DeepSpeed's train_batch_size; attach: "
        "no samples/s)", check=ge(1), default=None)
    tokens_per_sample: Optional[int] = _help("tokens per sample, for tokens/s (null = no tokens/s)", check=ge(1),
                                             default=None)


@dataclass
class LowRankConfig:
    """The whole `lowrank` section."""

    strategy: Literal["cuttlefish", "inrank", "dlrt", "tensor", "fixed", "none"] = _help(
        "cuttlefish (automatic switch), inrank (rank growth), dlrt (rank-adaptive integrator), tensor (tensorized "
        "layers with Bayesian rank pruning), fixed (ratio baseline), none (full rank)",
        default="cuttlefish",
    )
    target_modules: Union[list[str], str] = _help(
        "layers to factorize: list = suffix match on module names, string = regex full match",
        default=".*",
    )
    exclude_modules: Union[list[str], str, None] = _help("layers never to factorize (same matching rules)", default=None)
    min_rank: int = _help("no layer gets a rank below this (>= 1)", check=ge(1), default=1)
    seed: int = _help("seed for every random choice the plugin makes (Krylov start vectors, InRank factor init "
                      "and growth, the stand-in weights and inputs of layer timing)", default=0)
    monitor: MonitorConfig = _help("stable-rank monitor", default_factory=MonitorConfig)
    cuttlefish: CuttlefishConfig = _help("Cuttlefish strategy", default_factory=CuttlefishConfig)
    inrank: InRankConfig = _help("InRank strategy", default_factory=InRankConfig)
    dlrt: DLRTConfig = _help("DLRT strategy", default_factory=DLRTConfig)
    tensor: TensorConfig = _help("tensorized layers with Bayesian rank pruning", default_factory=TensorConfig)
    fixed: FixedConfig = _help("fixed-ratio baseline", default_factory=FixedConfig)
    switch: SwitchConfig = _help("switch execution", default_factory=SwitchConfig)
    logging: LoggingConfig = _help("logging", default_factory=LoggingConfig)


# ---- loading (strict) ---------------------------------------------------------------------------
# Rules beyond a field's type and range, enforced in config_from_dict (listed here for docs/CONFIG.md).
EXTRA_RULES = {
    "lowrank.target_modules": "not empty; a string must be a valid regex",
    "lowrank.exclude_modules": "a string must be a valid regex",
    "lowrank.cuttlefish.max_switch_step": ">= min_switch_step",
}


# Keys that existed once: a config that still sets one is refused with the reason (not just "unknown key").
REMOVED_KEYS: dict[tuple[str, str], str] = {}


def _refuse_removed(data: Any, path: str) -> None:
    for (section, key), why in REMOVED_KEYS.items():
        if isinstance(data, Mapping) and isinstance(data.get(section), Mapping) and key in data[section]:
            raise ConfigError(f"{path}.{section}.{key}: {why}")


def config_from_dict(data: Any, path: str = "lowrank") -> LowRankConfig:
    """The `lowrank` section from a mapping; unknown keys, wrong types, bad ranges → ConfigError."""
    _refuse_removed(data, path)
    cfg = dataclass_from_dict(LowRankConfig, data, path)
    targets = cfg.target_modules
    if targets == "" or targets == []:
        raise ConfigError(f"{path}.target_modules: empty; allowed: a non-empty list of name suffixes or a regex")
    for key in ("target_modules", "exclude_modules"):
        value = getattr(cfg, key)
        if isinstance(value, list) and "" in value:
            raise ConfigError(f"{path}.{key}[{value.index('')}]: empty name suffix; allowed: a non-empty string")
        validate_regex(f"{path}.{key}", value)
    cut = cfg.cuttlefish
    if cut.max_switch_step is not None and cut.max_switch_step < cut.min_switch_step:
        raise ConfigError(f"{path}.cuttlefish.max_switch_step: got {cut.max_switch_step}; "
                          f"allowed: >= min_switch_step ({cut.min_switch_step}) or null")
    if cut.search_above_saving and not (cfg.switch.profile_layers and cfg.switch.rank_search):
        raise ConfigError(f"{path}.cuttlefish.search_above_saving: needs {path}.switch.profile_layers and "
                          f"{path}.switch.rank_search (without the search such a layer is factorized near break-even)")
    return cfg


def config_to_dict(cfg: LowRankConfig) -> dict:
    """Plain nested dict (YAML/JSON-ready) that `config_from_dict` turns back into an equal config."""
    return dataclass_to_dict(cfg)


def _section(data: Mapping) -> Any:
    """A DeepSpeed-style config carries us under "lowrank"; a plain file is the section itself."""
    return data["lowrank"] if "lowrank" in data else data


def _from_file(path: Union[str, Path], pick: Callable[[dict], Any]) -> LowRankConfig:
    """Validation errors from a file also name the file (several configs may be in play)."""
    section = pick(read_mapping(path))
    try:
        return config_from_dict(section)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {path})") from None


def load_config(source: Union[str, Path, Mapping, LowRankConfig]) -> LowRankConfig:
    """From a dict, a YAML/JSON file, or a DeepSpeed config (dict or file) with a "lowrank" section.

    A LowRankConfig is re-validated (it may have been built or edited in code, bypassing the checks).
    """
    if isinstance(source, LowRankConfig):
        return config_from_dict(config_to_dict(source))
    if isinstance(source, Mapping):
        return config_from_dict(_section(source))
    return _from_file(source, _section)


def from_ds_config(ds_config: Union[str, Path, Mapping]) -> LowRankConfig:
    """The "lowrank" section of a DeepSpeed config (dict or file); no section means all defaults.

    Unlike `load_config`, a config without a "lowrank" key is not read as the section itself: its keys
    are DeepSpeed's, and a DeepSpeed job that does not mention the plugin gets the plugin's defaults.
    """
    if isinstance(ds_config, Mapping):
        return config_from_dict(ds_config.get("lowrank", {}))
    return _from_file(ds_config, lambda data: data.get("lowrank", {}))


def config_digest(cfg: LowRankConfig) -> str:
    """SHA-256 of the canonical JSON of `cfg` (resume compares it to detect a changed config)."""
    return digest(cfg)


def describe_schema() -> str:
    """docs/CONFIG.md: every key path, type, default, allowed range and help of the `lowrank` section."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["# The `lowrank` configuration section", "",
             "Generated by `python -m dist_lowrank.config > docs/CONFIG.md`; do not edit by hand.", "",
             "Read from YAML/JSON (`load_config`), a dict, or the `\"lowrank\"` section of a DeepSpeed config",
             "(`from_ds_config`; no section = all defaults). Unknown keys, wrong types and values outside the",
             "allowed range are rejected with one `ConfigError` line naming the key path.", "",
             "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for key, tp, default, allowed, text in schema_rows(LowRankConfig, "lowrank"):
        allowed = "; ".join(filter(None, [allowed, EXTRA_RULES.get(key, "")]))
        lines.append(f"| `{key}` | {cell(tp)} | `{cell(default)}` | {cell(allowed)} | {cell(text)} |")
    lines += ["", "Removed keys (a config that sets one is refused with this reason):", ""]
    lines += [f"- `lowrank.{section}.{key}`: {why}" for (section, key), why in REMOVED_KEYS.items()]
    return "\n".join(lines) + "\n"


schema_markdown = describe_schema  # earlier name, kept for callers


if __name__ == "__main__":
    print(describe_schema(), end="")
