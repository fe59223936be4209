"""switch.speed_table through the real `dist-lowrank train` (2 gloo ranks, ZeRO-2, the tiny GPT): the switch reads
the layer times from the table, not from live timing, and takes the plan those times give; a table that cannot
be read ends both ranks with the same one-line error before any training step."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dist_lowrank.profiling import InputShape
from dist_lowrank.speed_table import SpeedTable, shape_key
from tests.distributed.ckpt_common import cli

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]
CPU = torch.device("cpu")
# tests/e2e/tiny_gpt.yaml: n_embd 32, block 32, batch 4 per rank; its MLP is 32 -> 128 -> 32
SHAPES = {"mlp.c_fc": (nn.Linear(32, 128), InputShape((4, 32, 32))),
          "mlp.c_proj": (nn.Linear(128, 32), InputShape((4, 32, 128)))}
PER_RANK = {"mlp.c_fc": 1 / 20, "mlp.c_proj": 1 / 20}  # seconds per unit of rank; dense 1 s
SEARCH = ["lowrank.cuttlefish.rank_rule=scaled", "lowrank.switch.profile_layers=true",
          "lowrank.switch.rank_search=true", "lowrank.switch.min_speedup=1.5"]


def test_the_switch_takes_the_plan_of_the_table(tmp_path):
    table = SpeedTable({shape_key(layer, shape, CPU): {"dense_s": 1.0, "ranks": {r: r * PER_RANK[name]
                                                                                for r in (1, 8, 16, 24, 32)}}
                        for name, (layer, shape) in SHAPES.items()})
    path = table.save(tmp_path / "table.json")
    out = tmp_path / "run"
    cli(out, SEARCH + [f"lowrank.switch.speed_table={path}", "lowrank.cuttlefish.search_above_saving=true"])
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    (switch,) = [e for e in events if e["event"] == "switch"]
    assert switch["step"] == 8
    assert any(len(row["candidates"]) > 1 for row in switch["timing"].values())  # the search went below a plan
    # search_above_saving: a layer whose scaled rank saves nothing is searched from the last rank that saves any
    # (32x128: 25) instead of kept dense
    capped = [n for n, row in switch["timing"].items() if row["candidates"][0]["rank"] == 25]
    assert capped and all(switch["ranks"].get(n) != 25 for n in capped)  # 25 is 0.8x dense here: searched lower
    for name, row in switch["timing"].items():
        kind = next(k for k in PER_RANK if name.endswith(k))  # h.0.mlp.c_fc -> mlp.c_fc
        candidates = [c["rank"] for c in row["candidates"]]
        assert row["dense_s"] == 1.0
        assert all(c["factorized_s"] == pytest.approx(c["rank"] * PER_RANK[kind]) for c in row["candidates"])
        # by hand: the planned rank if 1 / (r * per_rank) >= 1.5, else the largest lower candidate that is
        def fast(r: int) -> bool:
            return 1 / (r * PER_RANK[kind]) >= 1.5

        expected = candidates[0] if fast(candidates[0]) else next((r for r in candidates[1:] if fast(r)), None)
        assert row["chosen_rank"] == expected
        assert switch["ranks"].get(name) == expected


def test_an_unreadable_table_ends_every_rank_with_one_named_error(tmp_path):
    missing = tmp_path / "nope.json"
    proc = cli(tmp_path / "run", SEARCH + [f"lowrank.switch.speed_table={missing}"], check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert f"switch.speed_table: {missing}: no such file" in output
    assert not (tmp_path / "run" / "events.jsonl").exists() or '"event": "train"' not in \
        (tmp_path / "run" / "events.jsonl").read_text()
