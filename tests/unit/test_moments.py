"""Projected Adam moments (linalg/moments.py) against brute-force EMAs of per-step factor gradients."""
import pytest
import torch

from dist_lowrank.linalg.moments import project_linear, project_squared, project_state


def _emas(grads, beta1=0.9, beta2=0.999):
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    for g in grads:
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
    return m, v


def test_first_moment_is_exact_ema_of_factor_gradients():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(7)]
    m, _ = _emas(grads)
    m_a, _ = _emas([g @ b.T for g in grads])  # G_A = G_W Bᵀ
    m_b, _ = _emas([a.T @ g for g in grads])  # G_B = Aᵀ G_W
    got_a, got_b = project_linear(m, a, b)
    torch.testing.assert_close(got_a, m_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_b, m_b, rtol=1e-12, atol=1e-12)


def test_second_moment_formula_and_exact_case():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(7)]
    _, v = _emas(grads)
    got_a, got_b = project_squared(v, a, b)
    # the formula, entry by entry: V_A[i,k] = Σ_j V[i,j] B[k,j]², V_B[k,j] = Σ_i A[i,k]² V[i,j]
    for i in range(6):
        for k in range(3):
            assert abs(got_a[i, k] - sum(v[i, j] * b[k, j] ** 2 for j in range(5))) < 1e-12
    for k in range(3):
        for j in range(5):
            assert abs(got_b[k, j] - sum(a[i, k] ** 2 * v[i, j] for i in range(6))) < 1e-12
    assert (got_a >= 0).all() and (got_b >= 0).all()
    # exact when each factor row/column has one non-zero: no cross terms to drop
    b_sparse = torch.zeros(3, 5, dtype=torch.float64)
    b_sparse[0, 1], b_sparse[1, 3], b_sparse[2, 4] = 1.5, -0.7, 2.0
    a_sparse = torch.zeros(6, 3, dtype=torch.float64)
    a_sparse[0, 0], a_sparse[2, 1], a_sparse[5, 2] = 0.3, -1.1, 0.8
    _, v_a = _emas([g @ b_sparse.T for g in grads])
    _, v_b = _emas([a_sparse.T @ g for g in grads])
    torch.testing.assert_close(project_squared(v, a_sparse, b_sparse)[0], v_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(project_squared(v, a_sparse, b_sparse)[1], v_b, rtol=1e-12, atol=1e-12)
    # and in general it is not exact (the test can fail): dense factors give cross terms
    _, v_a_dense = _emas([g @ b.T for g in grads])
    assert not torch.allclose(got_a, v_a_dense)


def test_project_state_keys_step_and_dtype():
    a, b = torch.randn(4, 2), torch.randn(2, 3)
    m, v = torch.randn(4, 3), torch.rand(4, 3)
    step = torch.tensor(17.0)
    sa, sb = project_state({"step": step, "exp_avg": m, "exp_avg_sq": v}, a, b)
    assert sa["step"] == 17 and sb["step"] == 17 and sa["step"] is not step and sa["step"] is not sb["step"]
    torch.testing.assert_close(sa["exp_avg"], m @ b.T)
    torch.testing.assert_close(sb["exp_avg_sq"], (a * a).T @ v)
    assert sa["exp_avg"].shape == (4, 2) and sb["exp_avg"].shape == (2, 3) and sa["exp_avg"].dtype == torch.float32
    with pytest.raises(ValueError, match="exp_avg"):
        project_state({"exp_avg": torch.zeros(3, 4)}, a, b)


def test_lr_scale_companion_group_and_scheduler_keep_the_scale():
    from dist_lowrank.backends.param_groups import GroupLayout, rebind_scheduler
    from dist_lowrank.errors import DistLowRankError

    w, keep = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([w, keep], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    sched.step()
    layout = GroupLayout.capture(opt, {"l.weight": w, "k": keep})
    layout.refresh(opt.param_groups)
    named = {"k": keep, "l.first.weight": torch.nn.Parameter(torch.zeros(2, 3)),
             "l.second.weight": torch.nn.Parameter(torch.zeros(3, 2))}
    new_layout, origins = layout.rebase({"l": ["l.weight"]}, named, companions=True, lr_scale=0.25)
    assert [g.names for g in new_layout.groups] == [["k"], ["l.first.weight", "l.second.weight"]]
    assert new_layout.groups[1].hyper["lr"] == 0.25 * new_layout.groups[0].hyper["lr"]
    new_opt = torch.optim.AdamW(new_layout.param_groups(named))
    rebind_scheduler(sched, new_opt, origins)
    sched.step()
    assert new_opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
    assert new_opt.param_groups[1]["lr"] == pytest.approx(0.25 * 0.1 * 0.25)
    with pytest.raises(DistLowRankError, match="lr_scale"):
        layout.rebase({"l": ["l.weight"]}, named, companions=False, lr_scale=0.5)
