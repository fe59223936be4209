"""The Bayesian rank model and its method in one process (issue 17): the EM update against closed forms written
here and shown to maximize their objectives, the prior's schedule and term (autograd vs the per-slice decay written
here), the prune rule, a prune through the pipeline that keeps the masked model's function and every untouched
parameter's state, and one-line refusals of bad shapes and configs."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dist_lowrank.config import LowRankConfig
from dist_lowrank.config_io import dataclass_from_dict
from dist_lowrank.errors import ConfigError
from dist_lowrank.methods.tensor import formats
from dist_lowrank.methods.tensor.config import TensorConfig
from dist_lowrank.methods.tensor.prior import em_scales, kl_weight, penalty, slice_weights
from tests.distributed.switch_common import MLP

pytestmark = pytest.mark.unit


def _objective(lam: float, m: float, d: int, prior: str, eta: float) -> float:
    """log N(slice | 0, λ) + log p(λ) up to constants: the function whose maximizer the M-step is (log-uniform
    as the reference uses it, with D + 1 in place of D; half-Cauchy on λ's own scale)."""
    if prior == "log_uniform":
        return -m / (2 * lam) - (d + 1) / 2 * math.log(lam)
    return -m / (2 * lam) - d / 2 * math.log(lam) - math.log1p(lam / eta ** 2)


@pytest.mark.parametrize("prior", ["log_uniform", "half_cauchy"])
def test_em_update_is_the_closed_form_and_maximizes_the_objective(prior: str) -> None:
    m, d, eta = torch.tensor([3.0, 0.02, 40.0, 1e-9]), 24, 0.7
    got = em_scales(m, d, prior, eta)
    for mk, lam in zip(m.tolist(), got.tolist()):
        if prior == "log_uniform":
            expected = mk / (d + 1)
        else:  # the positive root of (D + 2) λ² − (M − η²D) λ − η²M = 0
            a, b, c = d + 2, mk - eta ** 2 * d, -(eta ** 2) * mk
            expected = (b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
        assert lam == pytest.approx(expected, rel=1e-12)
        best = _objective(lam, mk, d, prior, eta)  # a maximum: both neighbours are lower
        assert best > _objective(lam * 1.001, mk, d, prior, eta) and best > _objective(lam / 1.001, mk, d, prior, eta)


def test_prior_weight_schedule() -> None:
    cfg = TensorConfig(kl_mult=0.5, no_kl_steps=10, warmup=20)
    assert [kl_weight(s, cfg) for s in (1, 10, 11, 20, 30, 31, 100)] == [0, 0, 0.5 / 20, 0.5 * 10 / 20, 0.5, 0.5, 0.5]
    assert kl_weight(11, TensorConfig(kl_mult=0.5, no_kl_steps=10, warmup=0)) == 0.5


def test_prior_term_is_a_per_slice_decay() -> None:
    """Its gradient on core c is w/λ_k times the entries of slot k's slice (written here per format's groups)."""
    spec = formats.make_spec("tt", 12, 20, 3, row_modes=(3, 4), col_modes=(4, 5))
    gen = torch.Generator().manual_seed(0)
    cores = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in formats.core_shapes(spec)]
    groups = formats.rank_groups(spec)
    lams = [torch.rand(g.size, generator=gen, dtype=torch.float64) + 0.1 for g in groups]
    w = 0.3
    penalty(cores, [g.prior for g in groups], slice_weights(lams, w)).backward()
    expected = [torch.zeros_like(c) for c in cores]
    for g, lam in zip(groups, lams):
        for c, dim in g.prior:
            shape = [1] * cores[c].dim()
            shape[dim] = g.size
            expected[c] += (w / lam).reshape(shape) * cores[c].detach()
    for core, want in zip(cores, expected):
        torch.testing.assert_close(core.grad, want, rtol=1e-5, atol=1e-7)
    # the last bond's λ also governs the first index of the last core (the reference's convention)
    assert groups[-1].prior == ((len(cores) - 2, 2), (len(cores) - 1, 0))


def _cfg(**tensor) -> LowRankConfig:
    return dataclass_from_dict(LowRankConfig, {"strategy": "tensor", "target_modules": ["net.2", "net.4"],
                                               "tensor": {"format": "ttm", "init_rank": 4, **tensor}}, "lowrank")


def _method(cfg: LowRankConfig):
    from dist_lowrank import prepare_model
    from dist_lowrank.backends.local_backend import LocalBackend
    from dist_lowrank.controller import LowRankController

    torch.manual_seed(0)
    backend = LocalBackend(prepare_model(MLP(), cfg), lambda p: torch.optim.Adam(p, lr=1e-2))
    controller = LowRankController(backend, cfg)
    controller.start()
    return backend, controller


def test_decide_keeps_slots_above_the_threshold_and_at_least_min_rank() -> None:
    _, controller = _method(_cfg(threshold=0.5, min_rank=2))
    method = controller.method
    measurement = {"net.2": [[0.9, 0.1, 0.6, 0.2]], "net.4": [[0.1, 0.3, 0.05, 0.2]], "x": [[1.0, 2.0]]}
    plan = method.decide(7, measurement)
    assert plan.kind == "prune" and plan.keep == {"net.2": [[0, 2]], "net.4": [[1, 3]]}  # floor: the 2 largest
    assert plan.ranks == {"net.2": 2, "net.4": 2}
    assert method.decide(7, {"x": [[1.0, 2.0]]}) is None


def test_em_through_the_controller_and_a_prune_that_keeps_the_masked_function() -> None:
    """Adam steps with the prior on; λ after each step = the closed form on the cores read back here; the prune
    (slots below the threshold) leaves the output equal to the unpruned model with those slices zeroed, the
    pruned cores' moments sliced, every other parameter and its state untouched bit for bit."""
    cfg = _cfg(kl_mult=1e-2, prune_every=4, prune_after=4, threshold=1.0)  # threshold set below, from λ
    backend, controller = _method(cfg)
    method = controller.method
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 12, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    for step in range(1, 4):
        loss = controller.regularize(F.cross_entropy(backend.model(x), y))
        backend.backward(loss)
        backend.step()
        controller.after_step(step, float(loss.detach()))
        effective = {}
        for name, layer in method.targets.items():
            closed = [m.double() / (d + 1) for m, d in zip(formats.slice_sums(layer.spec, layer.cores),
                                                           formats.slice_counts(layer.spec))]
            for lam, want in zip(method.scales[name], closed):
                torch.testing.assert_close(lam, want, rtol=1e-6, atol=0)
            effective[name] = sum(int((want >= cfg.tensor.threshold).sum()) for want in closed)
        # the step's `prior` event: its weight and, per layer, the slots a prune would keep now
        (prior,) = [e for e in controller.events if e["event"] == "prior" and e["step"] == step]
        assert prior["effective_ranks"] == effective and prior["kl_weight"] == method.weight
    # the prior's term was in the loss: Adam moved the cores by its decay too (weight > 0 after step 0)
    assert method.weight == pytest.approx(1e-2)
    # step 4: threshold between the 2nd and 3rd smallest λ of net.2's bond -> 2 of its slots go
    loss = controller.regularize(F.cross_entropy(backend.model(x), y))
    backend.backward(loss)
    backend.step()
    method.update(4, controller.probe)
    lam = sorted(method.scales["net.2"][0].tolist())
    method.cfg.tensor.threshold = (lam[1] + lam[2]) / 2
    plan = method.decide(4, method.measure(4, controller.probe))
    assert plan is not None and len(plan.keep["net.2"][0]) == len(lam) - 2
    before = {n: p.detach().clone() for n, p in backend.model.named_parameters()}
    states = {n: {k: v.clone() for k, v in backend.optimizer.state[p].items()} for n, p in backend.model.named_parameters()}
    masked = copy.deepcopy(backend.model)
    for name, kept in plan.keep.items():
        layer = masked.get_submodule(name)
        for group, k in zip(formats.rank_groups(layer.spec), kept):
            drop = [i for i in range(group.size) if i not in k]
            with torch.no_grad():
                for c, dim in group.prune:
                    layer.cores[c].index_fill_(dim, torch.tensor(drop), 0.0)
    old_specs = {n: method.targets[n].spec for n in plan.keep}
    controller.execute(plan)
    probe = torch.randn(9, 12, generator=gen)
    torch.testing.assert_close(backend.model(probe), masked(probe), rtol=0, atol=1e-6)
    after = dict(backend.model.named_parameters())
    sliced = 0
    for name, value in before.items():
        param, state = after[name], backend.optimizer.state[after[name]]
        layer, leaf = name.rsplit(".", 1)
        want, want_state = value, states[name]
        if layer in plan.keep and leaf.startswith("core_"):  # value and moments sliced alike, the step kept
            index = formats.pruned(old_specs[layer], plan.keep[layer])[1][int(leaf[5:])]
            for dim, kept in enumerate(index):
                if kept is not None:
                    want = want.index_select(dim, torch.tensor(kept))
                    want_state = {k: v if v.dim() == 0 else v.index_select(dim, torch.tensor(kept))
                                  for k, v in want_state.items()}
            sliced += param.shape != value.shape
        assert torch.equal(param.detach(), want), name
        assert state.keys() == want_state.keys() and all(torch.equal(state[k], v) for k, v in want_state.items()), name
    assert sliced == 2 * len(plan.keep)  # TT-matrix with 2 cores: one bond, both its cores sliced
    assert method.ranks["net.2"] == sum(method.targets["net.2"].spec.ranks) < sum(masked.get_submodule("net.2").spec.ranks)
    assert [len(s) for s in method.scales["net.2"]] == list(method.targets["net.2"].spec.ranks)
    events = [e for e in controller.events if e["event"] in ("rank_update", "prune")]
    assert [e["event"] for e in events] == ["rank_update", "rank_update", "prune"]


def test_bad_modes_and_configs_fail_in_one_line() -> None:
    from dist_lowrank import prepare_model

    with pytest.raises(ConfigError, match=r"lowrank.tensor: net.2 \(40x48\):.*") as info:
        prepare_model(MLP(), _cfg(row_modes=[5, 7]))
    assert "\n" not in str(info.value) and "35" in str(info.value)
    with pytest.raises(ConfigError, match="lowrank.tensor.min_rank: 5 > init_rank 4"):
        _method(_cfg(min_rank=5))
    with pytest.raises(ConfigError, match="lowrank.tensor.format"):
        _cfg(format="tt-matrix")
    with pytest.raises(ConfigError, match="needs a model converted"):
        from dist_lowrank.backends.local_backend import LocalBackend
        from dist_lowrank.controller import LowRankController

        LowRankController(LocalBackend(MLP(), lambda p: torch.optim.SGD(p, lr=0.1)), _cfg())
