"""GroupLayout (backends/param_groups.py): rebasing at a switch, companions, the manifest form, refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_lowrank.backends.param_groups import GroupLayout, Origin, ParamGroup, rebind_scheduler, rebuilt_optimizer
from dist_lowrank.errors import DistLowRankError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

BEFORE = GroupLayout([ParamGroup(["0.weight", "2.weight"], {"lr": 0.1, "betas": (0.9, 0.99), "tag": "d"}),
                      ParamGroup(["0.bias", "2.bias"], {"lr": 0.01, "weight_decay": 0.0})])
LAYERS = {"2": ["2.weight", "2.bias"]}
AFTER = ["0.weight", "0.bias", "2.first.weight", "2.second.weight", "2.second.bias"]


def test_factors_join_the_weights_group_and_the_new_bias_the_bias_group():
    layout, origins = BEFORE.rebase(LAYERS, AFTER, companions=False)
    assert [g.names for g in layout.groups] == [["0.weight", "2.first.weight", "2.second.weight"],
                                                ["0.bias", "2.second.bias"]]
    assert [g.hyper for g in layout.groups] == [g.hyper for g in BEFORE.groups]
    assert origins == [Origin(0), Origin(1)]


def test_companion_groups_copy_their_source_and_a_group_left_empty_is_dropped():
    layout, origins = BEFORE.rebase(LAYERS, AFTER, companions=True)
    assert [g.names for g in layout.groups] == [["0.weight"], ["0.bias"], ["2.first.weight", "2.second.weight"],
                                                ["2.second.bias"]]
    assert layout.groups[2].hyper == BEFORE.groups[0].hyper and layout.groups[3].hyper == BEFORE.groups[1].hyper
    assert origins == [Origin(0), Origin(1), Origin(0, True), Origin(1, True)]
    only = GroupLayout([ParamGroup(["2.weight"], {"lr": 1.0}), ParamGroup(["0.weight", "0.bias", "2.bias"])])
    layout, origins = only.rebase(LAYERS, AFTER, companions=True)
    assert [o.source for o in origins] == [1, 0, 1] and origins[1].fresh  # group 0 emptied: its companion remains


def test_a_layer_split_over_groups_is_refused_by_name():
    split = GroupLayout([ParamGroup(["4.u"]), ParamGroup(["4.v", "4.bias"])])
    with pytest.raises(DistLowRankError, match=r"4\.first\.weight replaces \['4\.u', '4\.v'\]"):
        split.rebase({"4": ["4.u", "4.v", "4.bias"]}, ["4.first.weight", "4.second.weight", "4.second.bias"], False)


def test_manifest_round_trip_keeps_tuples_and_refuses_what_json_cannot_hold():
    meta = BEFORE.to_meta()
    assert meta[0]["hyper"]["betas"] == [0.9, 0.99]
    back = GroupLayout.from_meta(meta)
    assert [(g.names, g.hyper) for g in back.groups] == [(g.names, g.hyper) for g in BEFORE.groups]
    bad = GroupLayout([ParamGroup(["w"], {"fn": object()})])
    with pytest.raises(DistLowRankError, match="param group 0: fn: a value of type object"):
        bad.to_meta()


def test_a_factory_that_ignores_its_params_is_refused():
    model = nn.Linear(3, 2)
    named = dict(model.named_parameters())
    layout = GroupLayout([ParamGroup(["weight"], {"lr": 0.1}), ParamGroup(["bias"], {"lr": 0.2})])
    built = rebuilt_optimizer(lambda groups: torch.optim.AdamW(groups), layout, named)
    assert [g["lr"] for g in built.param_groups] == [0.1, 0.2]
    with pytest.raises(DistLowRankError, match="optimizer_factory: the optimizer it built does not hold"):
        rebuilt_optimizer(lambda groups: torch.optim.AdamW(model.parameters()), layout, named)


def test_rebind_keeps_the_position_and_gives_companions_their_sources_schedule():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 2.0}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5 ** s, lambda s: 1.0])
    for _ in range(3):
        opt.step()
        sched.step()
    extra = nn.Parameter(torch.zeros(2))
    new = torch.optim.SGD([{**{k: v for k, v in g.items() if k != "params"}, "params": g["params"]}
                           for g in opt.param_groups] + [{**opt.param_groups[0], "params": [extra]}])
    rebind_scheduler(sched, new, [Origin(0), Origin(1), Origin(0, True)])
    assert sched.optimizer is new and sched.last_epoch == 3 and sched.base_lrs == [1.0, 2.0, 1.0]
    new.step()
    sched.step()
    assert [g["lr"] for g in new.param_groups] == [0.5 ** 4, 2.0, 0.5 ** 4]
