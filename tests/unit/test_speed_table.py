"""The stored layer-time table (switch.speed_table): measured per distinct shape, saved and read back, looked up
with interpolation, and read by the switch's rank search instead of timing live. Decisions are checked against
tables whose times are set by hand in the test."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dist_lowrank.errors import ConfigError
from dist_lowrank.plan import Plan
from dist_lowrank.profiling import keep_dense_where_not_faster, search_ranks
from dist_lowrank.speed_table import SpeedTable, measure_speed_table, shape_key, table_timer

pytestmark = pytest.mark.unit
CPU = torch.device("cpu")


def hand_table(modules: dict, shapes: dict, per_rank: float, ranks=range(8, 128, 8)) -> SpeedTable:
    """Dense 1 s; rank r: r * per_rank s (measured at 1 and at `ranks`)."""
    return SpeedTable({shape_key(modules[n], shapes[n], CPU): {"dense_s": 1.0,
                                                                "ranks": {r: r * per_rank for r in [1, *ranks]}}
                       for n in modules})


def test_measured_once_per_shape_at_every_eighth_rank_and_read_back_the_same(tmp_path):
    modules = {"h0": nn.Linear(24, 40), "h1": nn.Linear(24, 40), "out": nn.Linear(40, 16)}
    shapes = {"h0": (6, 24), "h1": (6, 24), "out": (6, 40)}
    table = measure_speed_table(modules, shapes, iters=1, device=CPU)
    assert len(table.entries) == 2  # h0 and h1 share one shape
    assert sorted(table.entries[shape_key(modules["h0"], shapes["h0"], CPU)]["ranks"]) == [1, 8, 16]
    assert sorted(table.entries[shape_key(modules["out"], shapes["out"], CPU)]["ranks"]) == [1, 8]
    assert all(t > 0 for e in table.entries.values() for t in [e["dense_s"], *e["ranks"].values()])
    back = SpeedTable.load(table.save(tmp_path / "t.json"))
    assert back.entries == table.entries


def test_lookup_interpolates_between_measured_ranks_and_covers_nothing_else():
    layer, shape = nn.Linear(64, 64), (4, 64)
    table = SpeedTable({shape_key(layer, shape, CPU): {"dense_s": 2.0, "ranks": {8: 0.4, 16: 0.8, 24: 1.6}}})
    assert table.seconds(layer, shape, None, CPU) == 2.0 and table.seconds(layer, shape, 16, CPU) == 0.8
    assert table.seconds(layer, shape, 20, CPU) == pytest.approx(1.2)  # halfway from 16 to 24
    assert table.seconds(layer, shape, 4, CPU) is None and table.seconds(layer, shape, 30, CPU) is None
    assert table.seconds(layer, (8, 64), 16, CPU) is None  # another input shape
    assert table.seconds(nn.Linear(64, 32), shape, 16, CPU) is None
    assert json.loads(shape_key(layer, shape, CPU))[0] == "cpu"  # a CPU table says nothing about a GPU


def test_the_search_reads_the_table_and_times_nothing_it_covers():
    widths = {"a": 128, "b": 96}
    modules = {n: nn.Linear(w, w) for n, w in widths.items()}
    shapes = {n: (4, w) for n, w in widths.items()}
    live = []
    timer = table_timer(hand_table({"a": modules["a"]}, {"a": shapes["a"]}, 1 / 50),
                        fallback=lambda m, s, i, d: live.append(m.in_features) or 1.0)
    plan = Plan("switch", 1, {"a": 64, "b": 64}, floors={"a": 20, "b": 20})
    kept, table = keep_dense_where_not_faster(plan, modules, shapes, iters=3, min_speedup=1.5, device=CPU,
                                              rank_search=True, timer=timer)
    # a: 50 / r >= 1.5 needs r <= 33.3; candidates 48, 40, 32, 24, 20 -> 32. b is not in the table: timed live
    assert search_ranks(64, 20) == [48, 40, 32, 24, 20] and kept.ranks == {"a": 32}
    assert table["a"]["chosen_speedup"] == pytest.approx(50 / 32) and table["a"]["dense_s"] == 1.0
    assert set(live) == {96} and "kept dense" in kept.reasons["b"]  # live stand-in: 1 s, as slow as dense


@pytest.mark.parametrize("text,what", [(None, "no such file"), ("{", "not valid JSON"),
                                       ('{"format": "x"}', "not a speed table"),
                                       ('{"format": "dist_lowrank.speed_table/1", "entries": {"k": {}}}',
                                        "malformed entry")])
def test_a_bad_table_file_is_one_config_error_naming_it(tmp_path, text, what):
    path = tmp_path / "table.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=f"switch.speed_table: {path}: {what}"):
        SpeedTable.load(path)


def test_median_of_measurements_entry_by_entry():
    a = SpeedTable({"k": {"dense_s": 1.0, "ranks": {8: 0.2}}})
    b = SpeedTable({"k": {"dense_s": 3.0, "ranks": {8: 0.9}}})
    c = SpeedTable({"k": {"dense_s": 2.0, "ranks": {8: 0.1}}})
    assert SpeedTable.median([a, b, c], {"m": 1}).entries == {"k": {"dense_s": 2.0, "ranks": {8: 0.2}}}
