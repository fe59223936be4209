"""DLRT (issue 16): the layer's one-pass gradients, each integrator's step and the truncation, against plain-torch
formulas written here (dense autograd, torch.linalg.qr / svd, the tangent-space projection) — not the code under
test — in float64; the method through a real LocalBackend; the capacity rule; config errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_lowrank import prepare_model
from dist_lowrank.backends.local_backend import LocalBackend
from dist_lowrank.config import LowRankConfig
from dist_lowrank.config_io import dataclass_from_dict
from dist_lowrank.controller import LowRankController
from dist_lowrank.errors import ConfigError
from dist_lowrank.methods.dlrt import integrator
from dist_lowrank.methods.dlrt.layer import DLRTConv2d, DLRTLinear
from dist_lowrank.methods.dlrt.rule import CapacityRule

pytestmark = pytest.mark.unit
M, N, R, LR = 12, 10, 3, 0.1


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def point():
    """U, S, V, a batch and its dense gradient G = dL/dW at W = U S Vᵀ (plain autograd)."""
    gen = torch.Generator().manual_seed(1)
    u, v = orthonormal(M, R, 2), orthonormal(N, R, 3)
    s = torch.diag(torch.tensor([3.0, 1.5, 0.7], dtype=torch.float64))
    x = torch.randn(16, N, generator=gen, dtype=torch.float64)
    t = torch.randn(16, M, generator=gen, dtype=torch.float64)
    w = (u @ s @ v.T).requires_grad_(True)
    ((x @ w.T - t) ** 2).mean().backward()
    return u, s, v, x, t, w.grad


def layer_at(u, s, v) -> DLRTLinear:
    layer = DLRTLinear(N, M, R, 2 * R, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.u[:, :R], layer.v[:, :R], layer.s[:R, :R] = u, v, s
        layer.k[:, :R], layer.l[:, :R] = u @ s, v @ s.T
    return layer


def test_one_backward_gives_the_integrators_gradients():
    u, s, v, x, t, g = point()
    layer = layer_at(u, s, v)
    ((layer(x) - t) ** 2).mean().backward()
    assert torch.allclose(layer.k.grad[:, :R], g @ v, atol=1e-12)
    assert torch.allclose(layer.l.grad[:, :R], g.T @ u, atol=1e-12)
    assert torch.allclose(layer.s.grad[:R, :R], u.T @ g @ v, atol=1e-12)
    assert layer.k.grad[:, R:].abs().max() == 0 and layer.s.grad[R:].abs().max() == 0  # inactive columns
    assert layer.u.grad is None and layer.v.grad is None  # frozen bases: no optimizer state, no decay


def sgd_inputs():
    u, s, v, x, t, g = point()
    return u, s, v, g, u @ s - LR * g @ v, v @ s.T - LR * g.T @ u, s - LR * u.T @ g @ v


def test_parallel_step_untruncated_is_w_minus_lr_times_the_tangent_projection():
    u, s, v, g, k1, l1, s1 = sgd_inputs()
    un, vn = integrator.new_directions(u, k1), integrator.new_directions(v, l1)
    core = integrator.augmented_core(k1, l1, s1, un, vn)
    w1 = torch.cat([u, un], 1) @ core @ torch.cat([v, vn], 1).T
    pu, pv = u @ u.T, v @ v.T
    tangent = pu @ g + g @ pv - pu @ g @ pv
    assert torch.allclose(w1, u @ s @ v.T - LR * tangent, atol=1e-10)


def test_kls_step_untruncated_is_the_galerkin_step_on_the_augmented_bases():
    u, s, v, g, k1, l1, s1 = sgd_inputs()
    uh, _ = torch.linalg.qr(torch.cat([k1, u], 1))  # the reference's orth([K1, U]), plain torch
    vh, _ = torch.linalg.qr(torch.cat([l1, v], 1))
    expected = u @ s @ v.T - LR * uh @ uh.T @ g @ vh @ vh.T
    un, vn = integrator.new_directions(u, k1), integrator.new_directions(v, l1)
    cross = -LR * (un.T @ g @ vn)
    core = integrator.augmented_core(k1, l1, s1, un, vn, cross)
    w1 = torch.cat([u, un], 1) @ core @ torch.cat([v, vn], 1).T
    assert torch.allclose(w1, expected, atol=1e-10)
    _, _, _, x, t, _ = point()  # the cross block from recorded (x, gy) equals Ũᵀ G Ṽ
    gy = 2 * (x @ (u @ s @ v.T).T - t) / t.numel()
    layer = layer_at(u, s, v)
    layer.records = [(x, gy)]
    assert torch.allclose(layer.cross_block(un, vn), un.T @ g @ vn, atol=1e-12) and layer.records is None


def test_truncation_error_equals_the_svd_tail_and_v_is_not_vh():
    u, s, v, g, k1, l1, s1 = sgd_inputs()
    un, vn = integrator.new_directions(u, k1), integrator.new_directions(v, l1)
    core = integrator.augmented_core(k1, l1, s1, un, vn)
    ua, va = torch.cat([u, un], 1), torch.cat([v, vn], 1)
    full = ua @ core @ va.T
    sigma = torch.linalg.svdvals(full)
    rank = integrator.truncation_rank(torch.linalg.svdvals(core), 0.3, False, 1, 2 * R)
    tails = [float(sigma[j:].norm()) for j in range(len(sigma))]
    assert rank == next(j for j, tail in enumerate(tails) if tail < 0.3 * float(sigma.norm()))
    result = integrator.truncate(core, ua, va, R, rank)
    err = (full - result.u @ result.s @ result.v.T).norm()
    assert abs(float(err) - float(sigma[rank:].norm())) < 1e-10
    assert torch.allclose(result.v.T @ result.v, torch.eye(rank, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("sigma, theta, absolute, lo, hi, expected", [
    ([4.0, 2.0, 1.0, 0.5], 0.3, False, 1, 4, 2),   # tails 4.61, 2.29, 1.12, 0.5; limit 1.38 -> j = 2
    ([4.0, 2.0, 1.0, 0.5], 1.2, True, 1, 4, 2),
    ([4.0, 2.0, 1.0, 0.5], 0.3, False, 3, 4, 3),   # min_rank
    ([4.0, 2.0, 1.0, 0.5], 0.01, False, 1, 2, 2),  # max_rank
])
def test_truncation_rank_by_hand(sigma, theta, absolute, lo, hi, expected):
    assert integrator.truncation_rank(torch.tensor(sigma), theta, absolute, lo, hi) == expected


def dlrt_config(**dlrt) -> LowRankConfig:
    return dataclass_from_dict(LowRankConfig, {"strategy": "dlrt", "target_modules": ["0"],
                                               "dlrt": {"init_rank": R, **dlrt}}, "lowrank")


@pytest.mark.parametrize("integ", ["parallel", "kls"])
def test_the_method_takes_the_plain_torch_step_through_a_real_backend(integ):
    """One SGD step of a model through LocalBackend + controller equals the formula above, truncated at theta."""
    torch.manual_seed(0)
    cfg = dlrt_config(theta=0.05, integrator=integ)
    model = prepare_model(nn.Sequential(nn.Linear(N, M, bias=False)).double(), cfg)
    layer = model[0]
    u, s, v = layer.u.detach()[:, :R].clone(), layer.s.detach()[:R, :R].clone(), layer.v.detach()[:, :R].clone()
    backend = LocalBackend(model, lambda p: torch.optim.SGD(p, lr=LR))
    controller = LowRankController(backend, cfg)
    gen = torch.Generator().manual_seed(4)
    x, t = torch.randn(16, N, generator=gen, dtype=torch.float64), torch.randn(16, M, generator=gen, dtype=torch.float64)
    w = (u @ s @ v.T).requires_grad_(True)
    ((x @ w.T - t) ** 2).mean().backward()
    g = w.grad
    backend.backward(((backend.model(x) - t) ** 2).mean())
    backend.step()
    controller.after_step(1, 1.0)
    pu, pv = u @ u.T, v @ v.T
    if integ == "parallel":
        full = u @ s @ v.T - LR * (pu @ g + g @ pv - pu @ g @ pv)
    else:
        uh, _ = torch.linalg.qr(torch.cat([u @ s - LR * g @ v, u], 1))
        vh, _ = torch.linalg.qr(torch.cat([v @ s.T - LR * g.T @ u, v], 1))
        full = u @ s @ v.T - LR * uh @ uh.T @ g @ vh @ vh.T
    sigma = torch.linalg.svdvals(full)
    rank = next(j for j in range(len(sigma) + 1) if float(sigma[j:].norm()) < 0.05 * float(sigma.norm()))
    rank = max(2, min(rank, 2 * R, layer.capacity))
    left, _, right = torch.linalg.svd(full)
    expected = left[:, :rank] @ torch.diag(sigma[:rank]) @ right[:rank]
    assert layer.rank == rank == controller.ranks["0"]
    assert torch.allclose(layer.weight_matrix().detach(), expected, atol=1e-8)
    r = layer.rank
    assert torch.allclose(layer.k[:, :r], layer.u[:, :r] @ layer.s[:r, :r], atol=1e-12)
    assert torch.allclose(layer.u[:, :r].T @ layer.u[:, :r], torch.eye(r, dtype=torch.float64), atol=1e-10)


def test_adam_moments_rotate_into_the_new_bases():
    """exp_avg of K after the step = the old one in the new V coordinates: m_K · (V_oldᵀ V_new)."""
    torch.manual_seed(0)
    cfg = dlrt_config(theta=0.05)
    model = prepare_model(nn.Sequential(nn.Linear(N, M, bias=False)).double(), cfg)
    backend = LocalBackend(model, lambda p: torch.optim.Adam(p, lr=1e-2))
    controller = LowRankController(backend, cfg)
    layer = model[0]
    x, t = torch.randn(16, N, dtype=torch.float64), torch.randn(16, M, dtype=torch.float64)
    backend.backward(((backend.model(x) - t) ** 2).mean())
    backend.step()
    v_old, m_k = layer.v.detach().clone(), backend.optimizer.state[layer.k]["exp_avg"].clone()
    controller.after_step(1, 1.0)
    r = layer.rank
    rotated = m_k[:, :R] @ (v_old[:, :R].T @ layer.v.detach()[:, :r])
    assert torch.allclose(backend.optimizer.state[layer.k]["exp_avg"][:, :r], rotated, atol=1e-10)
    assert backend.optimizer.state[layer.k]["exp_avg"][:, r:].abs().max() == 0


def test_capacity_grows_geometrically_and_shrinks_after_patience():
    cfg = dlrt_config(growth_factor=1.5, capacity_multiple=4, shrink_below=0.5, shrink_patience=3).dlrt
    rule = CapacityRule(cfg, {"a": (64, 64)}, {"a": 32})
    plan = rule.decide(1, {"a": 9}, {"a": 8}, {"a": 8})
    assert plan.kind == "resize" and plan.capacities == {"a": 16}  # 9 × 1.5 = 13.5 -> 16
    for _ in range(2):
        rule.observe("a", 3, 16)
    assert rule.decide(2, {"a": 3}, {"a": 3}, {"a": 16}) is None  # below for 2 < 3 steps: no reshard yet
    rule.observe("a", 3, 16)
    assert rule.decide(3, {"a": 3}, {"a": 3}, {"a": 16}).capacities == {"a": 8}  # 3 × 1.5 -> 8 (multiple of 4)
    rule.observe("a", 9, 16)
    assert rule.below["a"] == 0


def test_a_shrink_keeps_the_function_and_untouched_state():
    """Rank drops under the tolerance, the capacity shrinks through the pipeline (Slice), the output is unchanged."""
    torch.manual_seed(0)
    cfg = dlrt_config(theta=0.6, shrink_patience=1, init_rank=5, capacity_multiple=1, max_rank=8)
    model = prepare_model(nn.Sequential(nn.Linear(N, M), nn.Tanh(), nn.Linear(M, 4)).double(), cfg)
    backend = LocalBackend(model, lambda p: torch.optim.Adam(p, lr=1e-3))
    controller = LowRankController(backend, cfg)
    x = torch.randn(8, N, dtype=torch.float64)
    backend.backward(backend.model(x).square().mean())
    backend.step()
    head_state = {k: v.clone() for k, v in backend.optimizer.state[model[2].weight].items()}
    before_capacity = model[0].capacity
    controller.method.update(1, controller.probe)
    out_before = backend.model(x).detach()
    plan = controller.coordinator.agree(controller.method.decide(1, controller.method.measure(1, controller.probe)))
    assert plan is not None and plan.capacities["0"] < before_capacity
    controller.execute(plan)
    new = backend.unwrapped_model()
    assert new[0].capacity == plan.capacities["0"] and new[0].rank == controller.ranks["0"]
    assert torch.equal(backend.model(x).detach(), out_before)
    for key, value in head_state.items():
        assert torch.equal(backend.optimizer.state[new[2].weight][key], value)


@pytest.mark.parametrize("override, message", [
    ({"theta": 0}, "lowrank.dlrt.theta"),
    ({"integrator": "rk4"}, "lowrank.dlrt.integrator"),
    ({"shrink_below": 1.5}, "lowrank.dlrt.shrink_below"),
])
def test_bad_config_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        dlrt_config(**override)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_conv_layer_runs_as_two_convolutions_with_the_integrators_gradients():
    """DLRTConv2d's forward equals F.conv2d with W = U S Vᵀ reshaped to c_out×c_in×k×k (plain torch), and one
    backward gives G V, Gᵀ U, Uᵀ G V and the input gradient of that dense conv; KLS's cross block is Ũᵀ G Ṽ."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)).double()
    layer = DLRTConv2d.from_conv(conv, 4, 6)
    u, s, v = layer.u[:, :4].detach(), layer.s[:4, :4].detach(), layer.v[:, :4].detach()
    w = (u @ s @ v.T).reshape(conv.weight.shape).requires_grad_(True)
    x = torch.randn(5, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    target = torch.randn_like(conv(x.detach()))
    dense = F.conv2d(x2, w, conv.bias.detach(), conv.stride, conv.padding, conv.dilation)
    ((dense - target) ** 2).sum().backward()
    layer.record = True
    out = layer(x)
    assert torch.allclose(out, dense, atol=1e-10)
    ((out - target) ** 2).sum().backward()
    g = w.grad.reshape(8, -1)
    assert torch.allclose(layer.k.grad[:, :4], g @ v, atol=1e-9)
    assert torch.allclose(layer.l.grad[:, :4], g.T @ u, atol=1e-9)
    assert torch.allclose(layer.s.grad[:4, :4], u.T @ g @ v, atol=1e-9)
    assert torch.allclose(x.grad, x2.grad, atol=1e-10)
    assert layer.k.grad[:, 4:].abs().max() == 0
    un, vn = orthonormal(8, 2, 5), orthonormal(18, 3, 6)
    assert torch.allclose(layer.cross_block(un, vn), un.T @ g @ vn, atol=1e-9)
    grown = layer.resized(4, 6)
    assert type(grown) is DLRTConv2d and grown.stride == (2, 1) and grown.dilation == (1, 2)


def test_switch_factor_parts_are_the_svd_of_the_dense_weight():
    """The Factor parts a start=switch writes (from the pipeline's (A, B) = (U√Σ, √ΣVᵀ)) equal plain torch's SVD up
    to the sign of each component: U, V orthonormal, Σ the singular values, K = UΣ, L = VΣ; padded to a capacity."""
    from dist_lowrank.linalg import truncated_svd_factors
    from dist_lowrank.reshape.change import Factor, value_of

    w = torch.randn(9, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u, sigma, vh = torch.linalg.svd(w)
    factors = truncated_svd_factors(w, 3)
    part = {side: value_of(Factor(side), {}, factors, shape) for side, shape in
            {"u": (9, 5), "v": (7, 5), "sigma": (5, 5), "us": (9, 5), "vs": (7, 5)}.items()}
    signs = torch.sign((part["u"][:, :3] * u[:, :3]).sum(0))
    assert torch.allclose(part["u"][:, :3], u[:, :3] * signs, atol=1e-12)
    assert torch.allclose(part["v"][:, :3], vh[:3].T * signs, atol=1e-12)
    assert torch.allclose(torch.diag(part["sigma"])[:3], sigma[:3], atol=1e-12)
    assert torch.allclose(part["us"][:, :3], u[:, :3] * signs * sigma[:3], atol=1e-12)
    assert torch.allclose(part["vs"][:, :3], vh[:3].T * signs * sigma[:3], atol=1e-12)
    assert all(p[:, 3:].abs().max() == 0 for p in part.values())  # columns past the rank: zeros


def _on_row_shards(fn, blocks_per_rank: list[list[torch.Tensor]], *args):
    """Run `fn(blocks, *args, reduce)` as two ranks in lockstep (threads) whose `reduce` sums over both: the row-
    sharded integrator without a process group."""
    import threading

    barrier, shared, results = threading.Barrier(2), {}, {}

    def reduce(tensors):
        shared[threading.get_ident()] = tensors
        barrier.wait()
        total = [sum(parts) for parts in zip(*shared.values())]
        barrier.wait()
        return total

    def run(rank):
        results[rank] = fn(*[blocks[rank] for blocks in blocks_per_rank], *args, reduce)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_row_sharded_new_directions_span_what_the_gathered_qr_spans():
    """methods.dlrt.rows on two row blocks (one all-reduce per phase) gives orthonormal columns, orthogonal to U, with
    the projector of the gathered path's QR (plain torch); a rank-deficient residual (K1 = U·A + one direction)
    gives one column and zeros after it."""
    from dist_lowrank.methods.dlrt import rows

    gen = torch.Generator().manual_seed(8)
    u = orthonormal(20, 4, 9).float()
    for k1 in (torch.randn(20, 4, generator=gen), u @ torch.randn(4, 4, generator=gen)
               + torch.randn(20, 1, generator=gen) @ torch.randn(1, 4, generator=gen)):
        out = _on_row_shards(rows.new_directions, [[[u[:11]], [u[11:]]], [[k1[:11]], [k1[11:]]]], [4])
        q = torch.cat([out[0][0], out[1][0]])
        reference, _ = torch.linalg.qr(torch.cat([u, k1], 1).double())
        expected = reference[:, 4:].float()
        keep = int((q.norm(dim=0) > 0.5).sum())
        assert keep == torch.linalg.matrix_rank(k1 - u @ (u.T @ k1), rtol=1e-4)
        assert torch.allclose(q[:, :keep].T @ q[:, :keep], torch.eye(keep), atol=1e-6)
        assert q[:, keep:].abs().max() == 0 if keep < 4 else True
        assert (u.T @ q).abs().max() < 1e-6
        if keep == 4:
            assert torch.allclose(q @ q.T, expected @ expected.T, atol=1e-5)


class _LossScaledBackend(LocalBackend):
    """A LocalBackend with a hand-made static loss scale (what DeepSpeed fp16 does): backward of loss × SCALE,
    gradients unscaled before the step; `told` says whether it reports the scale to the plugin."""

    SCALE = 1024.0

    def __init__(self, *args, told: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.told = told

    def backward(self, loss):
        (loss * self.SCALE).backward()

    def step(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad /= self.SCALE
        super().step()

    def backward_scale(self) -> float:
        return self.SCALE if self.told else 1.0


def test_kls_under_a_loss_scale_equals_the_unscaled_run():
    """KLS keeps (x, gy) from the backward, where gy carries the fp16 loss scale: divided by the engine's
    backward_scale the run equals the unscaled one; a scale the plugin is not told about changes it."""
    def run(backend_cls, **kw):
        torch.manual_seed(0)
        cfg = dlrt_config(theta=0.05, integrator="kls")
        model = prepare_model(nn.Sequential(nn.Linear(N, M, bias=False)).double(), cfg)
        backend = backend_cls(model, lambda p: torch.optim.SGD(p, lr=LR), **kw)
        controller = LowRankController(backend, cfg)
        gen = torch.Generator().manual_seed(4)
        for step in range(1, 4):
            x = torch.randn(16, N, generator=gen, dtype=torch.float64)
            t = torch.randn(16, M, generator=gen, dtype=torch.float64)
            backend.backward(((backend.model(x) - t) ** 2).mean())
            backend.step()
            controller.after_step(step, 1.0)
        return model[0].weight_matrix().detach(), dict(controller.ranks)

    plain, scaled, untold = run(LocalBackend), run(_LossScaledBackend), run(_LossScaledBackend, told=False)
    assert scaled[1] == plain[1] and torch.allclose(scaled[0], plain[0], atol=1e-10)
    assert not torch.allclose(untold[0], plain[0], atol=1e-4)


def test_integrate_every_n_steps_keeps_the_bases_in_between():
    """integrate_every 3: U, V (and the rank) change only at steps 3 and 6; in between K, L, S take plain optimizer
    steps; KLS refuses it in one line."""
    torch.manual_seed(0)
    cfg = dlrt_config(theta=0.3, integrate_every=3)
    model = prepare_model(nn.Sequential(nn.Linear(N, M, bias=False)).double(), cfg)
    backend = LocalBackend(model, lambda p: torch.optim.SGD(p, lr=LR))
    controller = LowRankController(backend, cfg)
    gen = torch.Generator().manual_seed(4)
    moved = []
    for step in range(1, 7):
        before = model[0].u.detach().clone()
        x = torch.randn(16, N, generator=gen, dtype=torch.float64)
        backend.backward(((backend.model(x) - torch.randn(16, M, generator=gen, dtype=torch.float64)) ** 2).mean())
        backend.step()
        controller.after_step(step, 1.0)
        moved.append(not torch.equal(before, model[0].u.detach()))
    assert moved == [False, False, True, False, False, True]
    with pytest.raises(ConfigError, match="integrate_every"):
        from dist_lowrank.methods import check_run

        check_run(dlrt_config(integrate_every=2, integrator="kls"), sharded_parameters=False)
