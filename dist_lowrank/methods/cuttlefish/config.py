"""The `lowrank.cuttlefish` section: when Cuttlefish switches and how it picks ranks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from dist_lowrank.config_io import Range, ge, gt
from dist_lowrank.config_io import help_field as _help


@dataclass
class CuttlefishConfig:
    """Cuttlefish: switch when every tracked layer's stable rank has stopped moving."""

    preset: Literal["default", "reference"] = _help(
        "default: this project's detector; reference: the published Cuttlefish code's, decision for decision (int "
        "sranks, np.gradient, a full window first, the switch one measurement after detection; "
        "methods/cuttlefish/reference.py says where and why the default differs)", default="default")
    ema_window: int = _help("EMA window w of the srank history (alpha = 2/(w+1))", check=ge(1), default=15)
    last_k: int = _help("mean of the last k |d EMA| entries is compared with the threshold", check=ge(1), default=11)
    threshold: float = _help("a layer is stable when that mean is below this (> 0)", check=gt(0), default=0.1)
    relax_threshold: bool = _help("relax the threshold as fewer layers remain unstable (reference)", default=True)
    rank_rule: Literal["scaled", "raw"] = _help(
        "scaled: r = ceil(xi * srank) with xi = min(m,n)/srank(W_0); raw: r = ceil(srank)", default="scaled"
    )
    search_above_saving: bool = _help(
        "scaled rule: a layer whose rank saves no parameters is planned at the largest rank that still does, with "
        "its raw-rule floor ceil(srank), instead of kept dense, so the switch's rank search can take it lower (needs "
        "switch.profile_layers and switch.rank_search: without the search it would be factorized near break-even)",
        default=False)
    floor_fraction: float = _help("rank floor as a fraction of full rank, in [0, 1]", check=Range(0, 1), default=0.0)
    min_switch_step: int = _help("never switch before this optimizer step", check=ge(0), default=0)
    max_switch_step: Optional[int] = _help("switch at this step at the latest, stable or not (null = never force)", check=ge(0), default=None)
    frobenius_decay: float = _help("Frobenius decay lambda on factor pairs after the switch (>= 0)", check=ge(0), default=0.0)
