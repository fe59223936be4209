"""align_plan: ranks and floors rounded up to a multiple where the layer still saves parameters there."""
from __future__ import annotations

import pytest
from torch import nn

from dist_lowrank.plan import Plan
from dist_lowrank.rank_alignment import align_plan

pytestmark = pytest.mark.unit
MODULES = {"square": nn.Linear(256, 256), "wide": nn.Linear(256, 1024), "conv": nn.Conv2d(16, 32, 3),
           "adaptive": nn.Linear(64, 64)}  # saving caps: 127, 204, 26 (32 × 144), 31


def test_ranks_and_floors_round_up_below_the_saving_cap():
    plan = Plan("switch", 60, {"square": 47, "wide": 80, "conv": 25, "adaptive": 5},
                reasons={"square": "scaled rank"}, floors={"square": 41, "wide": 46, "conv": 20},
                capacities={"adaptive": 12})
    aligned = align_plan(plan, MODULES, 8)
    # 25 -> 32 would exceed the conv's cap 26: kept; its floor 20 -> 24 stays under its rank 25
    assert aligned.ranks == {"square": 48, "wide": 80, "conv": 25, "adaptive": 5}
    assert aligned.floors == {"square": 48, "wide": 48, "conv": 24}
    assert aligned.reasons["square"] == "scaled rank; rank 47 rounded up to 48 (switch.rank_multiple=8)"
    assert "wide" not in aligned.reasons and aligned.capacities == {"adaptive": 12}


def test_the_last_saving_rank_stays_and_multiple_one_is_the_plan_itself():
    plan = Plan("switch", 60, {"square": 127, "wide": 201}, floors={"square": 125})
    assert align_plan(plan, MODULES, 8).ranks == {"square": 127, "wide": 201}  # 128 and 208 save nothing
    assert align_plan(plan, MODULES, 8).floors == {"square": 125}
    assert align_plan(plan, MODULES, 1) is plan
