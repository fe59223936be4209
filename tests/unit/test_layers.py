"""Factorized layers: exact at full rank, SVD-tail error at rank r, exact parameter counts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dist_lowrank.layers import (InRankLinear, LowRankConv2d, LowRankLinear, frobenius_decay_, matrix_dims,
                                 max_saving_rank, saves_parameters, weight_matrix)

pytestmark = pytest.mark.unit


def tail(w: torch.Tensor, r: int) -> float:
    s = np.linalg.svd(w.detach().double().numpy(), compute_uv=False)
    return float(np.sqrt((s[r:] ** 2).sum()))


def test_linear_full_rank_and_tail():
    torch.manual_seed(0)
    dense = nn.Linear(40, 30)
    x = torch.randn(8, 40)
    full = LowRankLinear.from_dense(dense, 30)
    assert torch.allclose(full(x), dense(x), atol=1e-5)
    for r in (1, 5, 17):
        low = LowRankLinear.from_dense(dense, r)
        err = torch.linalg.norm((dense.weight - low.second.weight @ low.first.weight).double())
        assert float(err.detach()) == pytest.approx(tail(dense.weight, r), rel=1e-4)
        assert sum(p.numel() for p in low.parameters()) == r * (40 + 30) + 30
    back = LowRankLinear.from_dense(dense, 30).to_dense()
    assert torch.allclose(back.weight, dense.weight, atol=1e-5) and torch.equal(back.bias, dense.bias)


def test_conv2d_with_stride_and_padding():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    x = torch.randn(2, 6, 9, 9)
    full = LowRankConv2d.from_dense(conv, 10)
    assert torch.allclose(full(x), conv(x), atol=1e-5)
    low = LowRankConv2d.from_dense(conv, 4)
    w = weight_matrix(conv)
    approx = low.second.weight.reshape(10, 4) @ low.first.weight.reshape(4, -1)
    assert float(torch.linalg.norm((w - approx).double()).detach()) == pytest.approx(tail(w, 4), rel=1e-4)
    assert sum(p.numel() for p in low.parameters()) == 4 * (6 * 9) + 10 * 4 + 10
    assert torch.allclose(low.to_dense()(x), low(x), atol=1e-5)
    with pytest.raises(ValueError, match="groups"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), 2)


def test_hf_conv1d_weight_is_transposed():
    torch.manual_seed(0)
    conv1d = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs; weight stored (16, 24)
    nn.init.normal_(conv1d.bias)
    x = torch.randn(3, 5, 16)
    assert matrix_dims(conv1d) == (24, 16)
    full = LowRankLinear.from_dense(conv1d, 16)
    assert torch.allclose(full(x), conv1d(x), atol=1e-5)
    low = LowRankLinear.from_dense(conv1d, 3)
    assert float(torch.linalg.norm((conv1d.weight.T - low.second.weight @ low.first.weight).double())) == \
        pytest.approx(tail(conv1d.weight, 3), rel=1e-4)


def test_saving_rule():
    assert saves_parameters(100, 100, 49) and not saves_parameters(100, 100, 50)
    assert max_saving_rank(100, 100) == 49 and max_saving_rank(64, 288) == 52


def test_inrank_growth_keeps_function_and_masks_gradients():
    torch.manual_seed(0)
    dense = nn.Linear(20, 12)
    layer = InRankLinear.from_dense(dense, rank=2, capacity=4)
    x = torch.randn(5, 20)
    assert torch.allclose(layer(x), dense(x), atol=1e-6)  # U = 0 at start
    with torch.no_grad():
        layer.u[:, :2].normal_()  # trained active columns; inactive ones are zero by construction
    assert torch.count_nonzero(layer.u[:, 2:]) == 0
    before = layer(x)
    layer.grow(4)
    assert torch.allclose(layer(x), before, atol=1e-6)
    bigger = layer.with_capacity(8)
    assert bigger.capacity == 8 and torch.allclose(bigger(x), before, atol=1e-6)
    bigger(x).sum().backward()
    assert bigger.w0.grad is None  # frozen W0
    assert torch.count_nonzero(bigger.u.grad[:, 4:]) == 0 and torch.count_nonzero(bigger.v.grad[:, 4:]) == 0
    with pytest.raises(ValueError, match="never shrink"):
        bigger.grow(2)
    folded = bigger.fold(4)
    w = bigger.w0 + bigger.u[:, :4] @ bigger.v[:, :4].T
    assert float(torch.linalg.norm((folded.second.weight @ folded.first.weight - w).double())) == \
        pytest.approx(tail(w, 4), rel=1e-3, abs=1e-5)


def test_frobenius_decay_is_the_gradient_of_the_product_norm():
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(10, 8, 3))
    lam = 0.3
    frobenius_decay_(model, lam)
    first, second = model[0].first.weight, model[0].second.weight
    u, v = second.detach().clone().requires_grad_(), first.detach().clone().requires_grad_()
    (lam / 2 * (u @ v).pow(2).sum()).backward()
    assert torch.allclose(second.grad, u.grad, atol=1e-6) and torch.allclose(first.grad, v.grad, atol=1e-6)
