"""Factorized layers: exact at full rank, SVD-tail error at rank r, exact parameter counts, InRank growth
that keeps the function, Frobenius decay equal to the autograd gradient of λ/2‖UV‖²."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dist_lowrank.methods.inrank.layer import InRankLinear
from dist_lowrank.layers import (LowRankConv2d, LowRankLinear, build_factorized, empty_factorized,
                                 factor_pairs, frobenius_decay_, frobenius_penalty, matrix_dims, max_saving_rank,
                                 saves_parameters, weight_matrix)

pytestmark = pytest.mark.unit


def tail(w: torch.Tensor, r: int) -> float:
    """‖W − W_r‖_F of the best rank-r approximation, from numpy's singular values."""
    s = np.linalg.svd(w.detach().double().numpy(), compute_uv=False)
    return float(np.sqrt((s[r:] ** 2).sum()))


def product(layer: nn.Module) -> torch.Tensor:
    """second · first as the (m × n) matrix."""
    f, s = layer.first.weight.detach(), layer.second.weight.detach()
    return s.reshape(s.shape[0], -1) @ f.reshape(f.shape[0], -1)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fro(x: torch.Tensor) -> float:
    return float(torch.linalg.norm(x.detach().double()))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_full_rank_tail_counts_and_round_trip(bias):
    torch.manual_seed(0)
    dense = nn.Linear(40, 30, bias=bias)
    x = torch.randn(8, 40)
    full = LowRankLinear.from_dense(dense, 30)
    assert (full(x) - dense(x)).abs().max() < 1e-5
    for r in (1, 5, 17):
        low = LowRankLinear.from_dense(dense, r)
        assert low.rank == r and tuple(low.first.weight.shape) == (r, 40) and tuple(low.second.weight.shape) == (30, r)
        assert fro(dense.weight - product(low)) == pytest.approx(tail(dense.weight, r), rel=1e-4)
        assert n_params(low) == r * (40 + 30) + (30 if bias else 0)
    back = full.to_dense()
    assert isinstance(back, nn.Linear) and (back.weight - dense.weight).abs().max() < 1e-5
    assert (back.bias is None) if not bias else torch.equal(back.bias, dense.bias)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear.from_dense(dense, 31)
    with pytest.raises(TypeError, match="Conv2d"):
        LowRankLinear.from_dense(nn.Conv2d(2, 2, 1), 1)


def test_conv2d_with_stride_padding_dilation():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2, padding_mode="reflect")
    x = torch.randn(2, 6, 11, 11)
    full = LowRankConv2d.from_dense(conv, 10)
    assert (full(x) - conv(x)).abs().max() < 1e-5
    assert (full.first.stride, full.first.padding, full.first.dilation, full.first.padding_mode) == \
        ((2, 2), (2, 2), (2, 2), "reflect")
    assert full.second.kernel_size == (1, 1)
    low = LowRankConv2d.from_dense(conv, 4)
    w = weight_matrix(conv)
    assert tuple(w.shape) == matrix_dims(conv) == (10, 54)
    assert fro(w - product(low)) == pytest.approx(tail(w, 4), rel=1e-4)
    assert n_params(low) == 4 * (10 + 6 * 9) + 10
    back = low.to_dense()
    assert isinstance(back, nn.Conv2d) and (back(x) - low(x)).abs().max() < 1e-5
    assert (full.to_dense().weight - conv.weight).abs().max() < 1e-5
    with pytest.raises(ValueError, match="groups"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), 2)


def test_hf_conv1d_weight_is_transposed():
    torch.manual_seed(0)
    conv1d = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs; weight stored (16, 24)
    nn.init.normal_(conv1d.weight)
    nn.init.normal_(conv1d.bias)
    x = torch.randn(3, 5, 16)
    assert matrix_dims(conv1d) == (24, 16) and tuple(weight_matrix(conv1d).shape) == (24, 16)
    full = LowRankLinear.from_dense(conv1d, 16)
    assert (full(x) - conv1d(x)).abs().max() < 1e-5
    low = LowRankLinear.from_dense(conv1d, 3)
    assert fro(conv1d.weight.T - product(low)) == pytest.approx(tail(conv1d.weight, 3), rel=1e-4)
    assert n_params(low) == 3 * (24 + 16) + 24
    assert (full.to_dense()(x) - conv1d(x)).abs().max() < 1e-5


def test_from_factors_uses_the_given_factors_and_build_dispatches():
    torch.manual_seed(0)
    a, b = torch.randn(12, 3), torch.randn(3, 20)
    lin = nn.Linear(20, 12)
    layer = build_factorized(lin, a, b)
    assert isinstance(layer, LowRankLinear)
    assert torch.equal(layer.second.weight, a) and torch.equal(layer.first.weight, b)  # no SVD recomputed
    assert torch.equal(layer.second.bias, lin.bias)
    assert isinstance(build_factorized(Conv1D(12, 20), a, b), LowRankLinear)
    conv = nn.Conv2d(5, 12, 2)  # n = 5·2·2 = 20
    cl = build_factorized(conv, a, b)
    assert isinstance(cl, LowRankConv2d) and torch.equal(product(cl), a @ b)
    with pytest.raises(ValueError, match="12x20"):
        build_factorized(lin, b.T, a.T)
    with pytest.raises(TypeError, match="Embedding"):
        build_factorized(nn.Embedding(20, 12), a, b)
    meta = empty_factorized(conv, 3, device="meta")
    assert meta.first.weight.device.type == "meta" and meta.rank == 3


def test_saving_rule():
    for m, n in ((100, 100), (64, 288), (3, 7), (768, 3072)):
        r = max_saving_rank(m, n)
        assert saves_parameters(m, n, r) and not saves_parameters(m, n, r + 1)
        assert saves_parameters(m, n, r) == (r < m * n / (m + n))
    assert max_saving_rank(100, 100) == 49 and not saves_parameters(100, 100, 50)
    assert max_saving_rank(1, 1) == 0


def test_inrank_starts_unchanged_grows_unchanged_and_masks_gradients():
    torch.manual_seed(0)
    dense = nn.Linear(20, 12)
    layer = InRankLinear.from_dense(dense, rank=2, capacity=4)
    x = torch.randn(5, 20)
    assert (layer(x) - dense(x)).abs().max() < 1e-6  # U = 0 at start
    assert torch.count_nonzero(layer.v) == layer.v.numel()  # V small random
    layer(x).sum().backward()
    assert layer.w0.grad is None  # frozen W0
    assert torch.count_nonzero(layer.u.grad[:, :2]) > 0 and torch.count_nonzero(layer.u.grad[:, 2:]) == 0
    assert torch.count_nonzero(layer.v.grad[:, 2:]) == 0
    with torch.no_grad():
        layer.u[:, :2].normal_()  # as if trained; inactive columns are zero by construction
    before = layer(x).detach()
    layer.grow(4)
    assert layer.rank == 4 and (layer(x) - before).abs().max() < 1e-6
    bigger = layer.with_capacity(8)
    assert bigger.capacity == 8 and bigger.rank == 4 and (bigger(x) - before).abs().max() < 1e-6
    assert torch.equal(bigger.u[:, :4], layer.u) and torch.equal(bigger.v[:, :4], layer.v)
    assert torch.count_nonzero(bigger.u[:, 4:]) == 0 and torch.count_nonzero(bigger.v[:, 4:]) == bigger.v[:, 4:].numel()
    assert torch.equal(layer.with_capacity(8).v, bigger.v)  # seeded: every process draws the same
    bigger.grow(6)
    assert (bigger(x) - before).abs().max() < 1e-6
    bigger(x).sum().backward()
    assert bigger.w0.grad is None
    assert torch.count_nonzero(bigger.u.grad[:, 6:]) == 0 and torch.count_nonzero(bigger.v.grad[:, 6:]) == 0
    assert torch.count_nonzero(bigger.u.grad[:, 4:6]) > 0  # newly active columns learn at once
    with pytest.raises(ValueError, match="never shrink"):
        bigger.grow(2)
    with pytest.raises(ValueError, match="capacity"):
        bigger.grow(9)
    with pytest.raises(ValueError, match="capacity"):
        bigger.with_capacity(4)


def test_inrank_w0_modes():
    torch.manual_seed(0)
    dense = nn.Linear(16, 10)
    x = torch.randn(4, 16)
    trained = InRankLinear.from_dense(dense, 2, 4, w0_mode="trained")
    trained(x).sum().backward()
    assert trained.w0.grad is not None and trained.w0.requires_grad
    none = InRankLinear.from_dense(dense, 3, 6, w0_mode="none")
    assert none.w0 is None
    u, v = none.lowrank_part()
    assert tuple(u.shape) == (10, 3) and tuple(v.shape) == (16, 3)
    assert fro(dense.weight - u @ v.T) == pytest.approx(tail(dense.weight, 3), rel=1e-4)  # spectral init
    assert torch.count_nonzero(none.u[:, 3:]) == 0
    before = none(x).detach()
    none.grow(6)
    assert (none(x) - before).abs().max() < 1e-6
    with pytest.raises(ValueError, match="w0_mode"):
        InRankLinear(16, 10, 2, 4, w0_mode="bogus")


def test_inrank_fold_is_the_truncated_svd_of_the_whole_weight():
    torch.manual_seed(0)
    layer = InRankLinear.from_dense(nn.Linear(20, 12), rank=4, capacity=6)
    with torch.no_grad():
        layer.u[:, :4].normal_()
    u, v = layer.lowrank_part()
    w = (layer.w0 + u @ v.T).detach()
    for r in (3, 12):
        folded = layer.fold(r)
        assert isinstance(folded, LowRankLinear) and folded.rank == r
        assert fro(product(folded) - w) == pytest.approx(tail(w, r), rel=1e-4, abs=1e-5)
        assert torch.equal(folded.second.bias, layer.bias)
    x = torch.randn(3, 20)
    assert (layer.fold(12)(x) - layer(x)).abs().max() < 1e-5
    assert layer.fold().rank == 4


def test_factor_pairs_are_matrices():
    model = nn.Sequential(LowRankLinear(10, 8, 3), nn.ReLU(), LowRankConv2d(nn.Conv2d(4, 6, 3), 2), nn.Linear(3, 3))
    pairs = factor_pairs(model)
    assert [(n, tuple(v.shape), tuple(u.shape)) for n, v, u in pairs] == [("0", (3, 10), (8, 3)),
                                                                         ("2", (2, 36), (6, 2))]
    assert pairs[0][1] is model[0].first.weight and pairs[0][2] is model[0].second.weight


def test_frobenius_decay_is_the_gradient_of_the_product_norm():
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(10, 8, 3), LowRankConv2d(nn.Conv2d(4, 6, 3), 2))
    lam = 0.3
    existing = torch.randn(3, 10)
    model[0].first.weight.grad = existing.clone()  # decay adds to a gradient that is already there
    frobenius_decay_(model, lam)
    for i, layer in enumerate(model):
        first, second = layer.first.weight, layer.second.weight
        u = second.detach().reshape(second.shape[0], -1).clone().requires_grad_()
        v = first.detach().reshape(first.shape[0], -1).clone().requires_grad_()
        (lam / 2 * (u @ v).pow(2).sum()).backward()
        offset = existing if i == 0 else 0
        assert torch.allclose(second.grad.reshape(u.shape), u.grad, atol=1e-6)
        assert torch.allclose(first.grad.reshape(v.shape) - offset, v.grad, atol=1e-6)
        assert torch.count_nonzero(u.grad) > 0
    # the loss-term form has the same gradient
    twin = nn.Sequential(LowRankLinear(10, 8, 3), LowRankConv2d(nn.Conv2d(4, 6, 3), 2))
    twin.load_state_dict(model.state_dict())
    penalty = frobenius_penalty(twin, lam)
    assert float(penalty.detach()) == pytest.approx(lam / 2 * sum(fro(product(m)) ** 2 for m in model), rel=1e-5)
    penalty.backward()
    model[0].first.weight.grad -= existing
    for a, b in zip(model.parameters(), twin.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6)
