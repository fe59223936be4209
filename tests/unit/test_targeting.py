"""PEFT-style targeting and module surgery."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_lowrank.errors import ConfigError
from dist_lowrank.surgery import apply_rank_plan, count_parameters
from dist_lowrank.targeting import select_targets

pytestmark = pytest.mark.unit


def model():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(),
                         nn.Sequential(nn.Linear(32, 32), nn.Conv2d(2, 2, 1)), nn.Linear(32, 4))


def test_suffix_regex_and_exclude():
    m = model()
    assert list(select_targets(m, ["0"])) == ["0", "2.0"]  # suffix "0" matches "0" and "2.0"
    assert list(select_targets(m, ["2.0", "3"])) == ["2.0", "3"]
    assert list(select_targets(m, r"\d")) == ["0", "3"]  # regex full match
    assert list(select_targets(m, ".*", exclude_modules=["3"])) == ["0", "2.0", "2.1"]


@pytest.mark.parametrize("targets,match", [(["nope"], "'nope' matches no"), ("x.*", "matches no"), ([], "empty"),
                                           ("((", "not a valid regex")])
def test_bad_targets_are_named(targets, match):
    with pytest.raises(ConfigError, match=match):
        select_targets(model(), targets)


def test_surgery_counts_and_output():
    torch.manual_seed(0)
    m = model()
    x = torch.randn(3, 16)
    ref = m[3](m[2][0](m[1](m[0](x))))
    before = count_parameters(m)
    report = apply_rank_plan(m, {"0": 16, "2.0": 4})
    assert report.params_before == before
    assert report.params_after == before - (32 * 32) + 4 * 64 - (16 * 32) + 16 * 48
    assert [c.name for c in report.layers] == ["0", "2.0"]
    out = m[3](m[2][0](m[1](m[0](x))))
    assert out.shape == ref.shape
    with pytest.raises(ValueError, match="missing"):
        apply_rank_plan(m, {"missing": 2})
    with pytest.raises(ValueError, match="rank 99"):
        apply_rank_plan(m, {"3": 99})
