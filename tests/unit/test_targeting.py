"""PEFT-style targeting and module surgery."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dist_lowrank.errors import ConfigError
from dist_lowrank.layers import LowRankConv2d, LowRankLinear
from dist_lowrank.methods.inrank.layer import InRankLinear
from dist_lowrank.surgery import apply_rank_plan, count_parameters, replace_module
from dist_lowrank.targeting import select_targets

pytestmark = pytest.mark.unit


def model():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(),
                         nn.Sequential(nn.Linear(32, 32), nn.Conv2d(2, 2, 1)), nn.Linear(32, 4))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = Conv1D(24, 8)
        self.proj = nn.Linear(8, 8)
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4)
        self.emb = nn.Embedding(5, 8)


def test_suffix_regex_and_exclude():
    m = model()
    assert list(select_targets(m, ["0"])) == ["0", "2.0"]  # suffix "0" matches "0" and "2.0"
    assert list(select_targets(m, ["2.0", "3"])) == ["2.0", "3"]
    assert list(select_targets(m, ["3", "0"])) == ["0", "2.0", "3"]  # module order, not pattern order
    assert list(select_targets(m, r"\d")) == ["0", "3"]  # regex full match, not search
    assert list(select_targets(m, ".*", exclude_modules=["3"])) == ["0", "2.0", "2.1"]
    assert list(select_targets(m, ".*", exclude_modules=r"2\..*")) == ["0", "3"]
    assert list(select_targets(m, ["0"], exclude_modules=["absent"])) == ["0", "2.0"]
    assert select_targets(m, ["3"])["3"] is m[3]


def test_candidates_are_linear_conv2d_and_conv1d_only():
    net = nn.ModuleDict({"h": nn.ModuleList([Block(), Block()])})
    assert list(select_targets(net, ".*")) == ["h.0.c_attn", "h.0.proj", "h.1.c_attn", "h.1.proj"]
    assert list(select_targets(net, ["c_attn"])) == ["h.0.c_attn", "h.1.c_attn"]
    with pytest.raises(ConfigError, match="'attn' matches no"):
        select_targets(net, ["attn"])  # suffix on dotted names, not a substring
    with pytest.raises(ConfigError, match="'depthwise' matches no"):
        select_targets(net, ["depthwise"])  # groups != 1: not a matrix
    with pytest.raises(ConfigError, match="'emb' matches no"):
        select_targets(net, ["proj", "emb"])
    # the children of already factorized layers are never targets
    done = nn.Sequential(LowRankLinear(8, 8, 2), LowRankConv2d(nn.Conv2d(2, 2, 1), 1),
                         InRankLinear(8, 8, 1, 2), nn.Linear(8, 8))
    assert list(select_targets(done, ".*")) == ["3"]
    with pytest.raises(ConfigError, match="'first' matches no"):
        select_targets(done, ["first"])


@pytest.mark.parametrize("targets,exclude,match", [
    (["nope"], None, r"lowrank.target_modules: 'nope' matches no"),
    (["0", "nope"], None, "'nope' matches no"),
    ("x.*", None, r"regex 'x\.\*' matches no"),
    ([], None, "empty"),
    ("", None, "empty"),
    (None, None, "empty"),
    ("((", None, "not a valid regex"),
    (["0"], "[a", r"lowrank.exclude_modules: '\[a' is not a valid regex"),
])
def test_bad_targets_are_named(targets, exclude, match):
    with pytest.raises(ConfigError, match=match):
        select_targets(model(), targets, exclude)


def test_surgery_counts_output_and_errors():
    torch.manual_seed(0)
    m = model()
    x = torch.randn(3, 16)
    h0 = m[0](x).detach()
    w20 = m[2][0].weight.detach().clone()
    before = count_parameters(m)
    assert before == sum(p.numel() for p in m.parameters())
    report = apply_rank_plan(m, {"2.0": 4, "0": 16})
    assert report.params_before == before
    assert report.params_after == count_parameters(m) == before - (32 * 32) + 4 * 64 - (16 * 32) + 16 * 48
    assert [(c.name, c.shape, c.rank, c.params_before, c.params_after) for c in report.layers] == [
        ("0", (32, 16), 16, 16 * 32 + 32, 16 * 48 + 32), ("2.0", (32, 32), 4, 32 * 32 + 32, 4 * 64 + 32)]
    assert isinstance(m[0], LowRankLinear) and isinstance(m[2][0], LowRankLinear)
    assert (m[0](x) - h0).abs().max() < 1e-5  # full rank (min(32, 16) = 16): function kept
    s = torch.linalg.svdvals(w20.double())
    err = torch.linalg.norm((m[2][0].second.weight @ m[2][0].first.weight - w20).detach().double())
    assert float(err) == pytest.approx(float(s[4:].square().sum().sqrt()), rel=1e-4)  # rank 4: the SVD tail
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="missing"):
        apply_rank_plan(m, {"3": 2, "missing": 2})
    with pytest.raises(ValueError, match="3: rank 99"):
        apply_rank_plan(m, {"3": 99})
    with pytest.raises(ValueError, match="3: rank 0"):
        apply_rank_plan(m, {"3": 0})
    assert isinstance(m[3], nn.Linear)  # a bad plan leaves the model untouched
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())


def test_surgery_full_rank_keeps_the_function_and_uses_given_factors():
    torch.manual_seed(0)
    m = model()
    x = torch.randn(3, 16)
    conv = m[2][1]
    y = torch.randn(1, 2, 5, 5)
    conv_ref = conv(y).detach()
    a, b = torch.randn(4, 2), torch.randn(2, 32)
    bias = m[3].bias.detach().clone()
    hidden = m[2][0](m[1](m[0](x))).detach()
    report = apply_rank_plan(m, {"0": 16, "2.0": 32, "2.1": 2, "3": 2}, factors={"3": (a, b)})
    assert (m[2][0](m[1](m[0](x))) - hidden).abs().max() < 1e-5  # full rank: function kept
    assert (m[2][1](y) - conv_ref).abs().max() < 1e-5
    assert torch.equal(m[3].second.weight, a) and torch.equal(m[3].first.weight, b)  # factors used, no SVD
    assert (m[3](hidden) - (hidden @ (a @ b).T + bias)).abs().max() < 1e-5
    assert isinstance(m[2][1], LowRankConv2d) and [c.rank for c in report.layers] == [16, 32, 2, 2]
    with pytest.raises(ValueError, match="2.0: factors"):
        apply_rank_plan(model(), {"2.0": 3}, factors={"2.0": (a, b)})


def test_surgery_on_conv1d_and_inrank():
    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(8, 24), InRankLinear.from_dense(nn.Linear(8, 6), 2, 4))
    with torch.no_grad():
        net[1].u[:, :2].normal_()
    nn.init.normal_(net[0].weight)
    x = torch.randn(2, 24)
    ref = net(x).detach()
    report = apply_rank_plan(net, {"0": 8, "1": 6})
    assert [c.shape for c in report.layers] == [(8, 24), (6, 8)]
    assert isinstance(net[0], LowRankLinear) and isinstance(net[1], LowRankLinear)
    assert (net(x) - ref).abs().max() < 1e-5  # full rank: Conv1D transposed right, InRank folded
    assert report.params_after == 8 * 32 + 8 + 6 * 14 + 6


def test_replace_module():
    m = model()
    new = nn.Identity()
    old = replace_module(m, "2.1", new)
    assert isinstance(old, nn.Conv2d) and m[2][1] is new
    for bad in ("2.7", "9.0", "", "2.0.weight"):
        with pytest.raises(ValueError, match="no such module"):
            replace_module(m, bad, nn.Identity())
