"""DLRT on real ranks (issue 16): a rank-adaptive run on 2 ranks of DDP, FSDP2, ZeRO-2 and ZeRO-3 equals a
plain-torch DLRT written here on the global batch (dense autograd gradient, the parallel integrator's formulas,
torch.linalg.qr / svd, the documented truncation rule): the same rank trajectory, the same weights; every
non-DLRT parameter equals plain SGD's."""
from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from tests.dist_harness import run_ranks
from tests.distributed.dlrt_workers import DLRT_LAYERS, LR, SETTINGS, STEPS, SWITCH_STEP, dlrt_model, dlrt_worker
from tests.distributed.switch_common import global_batch, make_model

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]


def is_factor(name: str) -> bool:
    return any(name == f"{layer}.{leaf}" for layer in DLRT_LAYERS for leaf in "usvkl")


def orth_new(basis: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Columns of Q from qr([basis, update]) past the basis (plain torch)."""
    q, _ = torch.linalg.qr(torch.cat([basis, update], 1))
    return q[:, basis.shape[1]: basis.shape[1] + min(update.shape[1], basis.shape[0] - basis.shape[1])]


def dense_warmup(steps: int, ranks: dict[str, int]):
    """start=switch's dense phase in plain torch: SGD on the whole MLP for `steps` global batches, then each target's
    truncated SVD at `ranks` (U, diag σ, V)."""
    model = make_model().double()
    for step in range(1, steps + 1):
        model.zero_grad()
        F.cross_entropy(model(global_batch(step)[0].double()), global_batch(step)[1]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    factors = {}
    for name, r in ranks.items():
        u, sigma, vh = torch.linalg.svd(model.get_submodule(name).weight.detach())
        factors[name] = [u[:, :r], torch.diag(sigma[:r]), vh[:r].T]
    return model, factors


def reference_run(switch: Optional[tuple[int, dict]] = None) -> tuple[list[dict], dict, dict]:
    """Plain-torch DLRT with SGD: per step the dense gradient of each W = U S Vᵀ, K1 = US − λGV, L1 = VS − λGᵀU,
    S1 = S − λUᵀGV, the augmented core, its SVD truncated at ‖σ[j:]‖ < θ‖σ‖, ranks in [min_rank, min(m,n)/2].
    `switch` = (step, ranks): first the dense warm-up to that step, DLRT from its truncated SVD after it."""
    cfg = SETTINGS["dlrt"]
    if switch is None:
        model, first = dlrt_model().double(), 1
        layers = {n: model.get_submodule(n) for n in DLRT_LAYERS}
        factors = {n: [l.u.detach()[:, :l.rank].clone(), l.s.detach()[:l.rank, :l.rank].clone(),
                       l.v.detach()[:, :l.rank].clone()] for n, l in layers.items()}
    else:
        (model, factors), first = dense_warmup(*switch), switch[0] + 1
    others = {n: p for n, p in model.named_parameters()
              if not is_factor(n) and n.rsplit(".", 1)[0] not in DLRT_LAYERS or n.endswith("bias")}
    trajectory = []
    for step in range(first, STEPS + 1):
        ws = {n: (u @ s @ v.T).requires_grad_(True) for n, (u, s, v) in factors.items()}
        x, y = global_batch(step)
        h = x.double()
        for index, module in enumerate(model.net):
            name = f"net.{index}"
            h = F.linear(h, ws[name], module.bias) if name in ws else module(h)
        for p in others.values():
            p.grad = None
        F.cross_entropy(h, y).backward()
        with torch.no_grad():
            for p in others.values():
                p -= LR * p.grad
        ranks = {}
        for name, (u, s, v) in factors.items():
            g = ws[name].grad
            k1, l1, s1 = u @ s - LR * g @ v, v @ s.T - LR * g.T @ u, s - LR * u.T @ g @ v
            un, vn = orth_new(u, k1), orth_new(v, l1)
            core = torch.cat([torch.cat([s1, l1.T @ vn], 1), torch.cat([un.T @ k1, torch.zeros(un.shape[1], vn.shape[1],
                                                                                             dtype=u.dtype)], 1)], 0)
            p, sigma, qh = torch.linalg.svd(core)
            m, n = g.shape
            j = next(j for j in range(len(sigma) + 1) if float(sigma[j:].norm()) < cfg["theta"] * float(sigma.norm()))
            j = max(min(j, min(m, n) // 2, len(sigma)), cfg["min_rank"])
            factors[name] = [torch.cat([u, un], 1) @ p[:, :j], torch.diag(sigma[:j]), torch.cat([v, vn], 1) @ qh.T[:, :j]]
            ranks[name] = j
        trajectory.append(ranks)
    weights = {n: u @ s @ v.T for n, (u, s, v) in factors.items()}
    return trajectory, weights, {n: p.detach() for n, p in others.items()}


def expected_integrator_bytes(kind: str, result: dict) -> list[int]:
    """Per step, from the model's shapes: every layer's SVD + decision broadcast (the (r+p)² + (r+q)² + min + 1
    fp32 of the augmented core, p = min(r, m − r), q = min(r, n − r)); on ZeRO-3 the five factors' gathers
    ((2m + 2n + c)·c fp32 at capacity c); on FSDP2's row shards no factor is gathered, only S (c² fp32) and the
    sums of the row-block products: per basis two projections (r² fp32), two Gram matrices (r² and p² fp64),
    the last projection (r·p fp32), and the core's two blocks (r·q + p·r fp32). Plain SGD keeps no moments."""
    out = []
    for step in range(1, STEPS + 1):
        total = 0
        for name, (m, n) in result["dims"].items():
            r = result["trajectory"][step - 2][name] if step > 1 else SETTINGS["dlrt"]["init_rank"]
            c = result["capacity_trajectory"][step - 1][name]
            a, b = r + min(r, m - r), r + min(r, n - r)
            total += 4 * (a * a + min(a, b) + b * b + 1)
            if kind == "zero3":
                total += 4 * (2 * m + 2 * n + c) * c
            if kind == "fsdp2":
                p, q = a - r, b - r
                bases = sum(4 * 2 * r * r + 8 * (r * r + w * w) + 4 * r * w for w in (p, q))
                total += 4 * c * c + bases + 4 * (r * q + p * r)
        out.append(total)
    return out


@pytest.fixture(scope="module")
def reference():
    return reference_run()


@pytest.mark.parametrize("kind", ["ddp", "fsdp2", "zero1", "zero2", "zero3"])
def test_two_ranks_follow_the_plain_torch_dlrt(kind, reference):
    trajectory, weights, others = reference
    assert len({tuple(sorted(r.items())) for r in trajectory}) > 1, "the reference must change ranks"
    results = run_ranks(dlrt_worker, world=2, timeout=240, args=(kind,))
    for r in results:
        assert r["trajectory"] == trajectory, kind
        for name, w in weights.items():
            assert torch.allclose(r["weights"][name].double(), w, atol=2e-5), (kind, name)
        for name, p in others.items():
            assert torch.allclose(r["others"][name].double(), p, atol=2e-5), (kind, name)
        assert r["integrator_bytes"] == expected_integrator_bytes(kind, r), kind
    assert results[0]["resizes"] == results[1]["resizes"]


def test_a_perturbed_replica_takes_the_same_decisions(reference):
    """DDP with rank 1's factors perturbed by 1e-7 at step 3: the SVD and the truncation come from rank 0 through
    the coordinator, so both ranks keep one rank trajectory (the reference's) and the same shapes; the weights stay
    within the perturbation's reach of each other and of the reference."""
    trajectory, weights, _ = reference
    results = run_ranks(dlrt_worker, world=2, timeout=240, args=("ddp", True))
    assert results[0]["trajectory"] == results[1]["trajectory"] == trajectory
    assert results[0]["resizes"] == results[1]["resizes"] and results[0]["capacities"] == results[1]["capacities"]
    for name, w in weights.items():
        mine, theirs = results[0]["weights"][name].double(), results[1]["weights"][name].double()
        assert 0 < (mine - theirs).abs().max() < 1e-5, name  # perturbed, and still the same run
        assert torch.allclose(theirs, w, atol=2e-5), name
    steps = [e["step"] for e in results[0]["logged"]]
    assert steps[0] == 1 and [e["ranks"] for e in results[0]["logged"]] == \
        [trajectory[s - 1] for s in steps]  # rank_update events: one per change of the trajectory
    assert {s for s in range(2, len(trajectory) + 1) if trajectory[s - 1] != trajectory[s - 2]} <= set(steps)


SWITCH_KINDS = ["fsdp2", "zero3"]


@pytest.fixture(scope="module")
def switched_runs():
    return {kind: run_ranks(dlrt_worker, world=2, timeout=240, args=(kind, False, True)) for kind in SWITCH_KINDS}


@pytest.mark.parametrize("kind", SWITCH_KINDS)
def test_start_switch_trains_dense_then_follows_the_plain_torch_dlrt(kind, switched_runs):
    """start=switch: dense SGD until Cuttlefish's forced switch step, then DLRT layers from each trained weight's
    truncated SVD at the switch's ranks, then rank adaptation — equal to the same in plain torch (dense_warmup and
    the reference integrator); every non-factor parameter too."""
    results = switched_runs[kind]
    step, ranks = results[0]["switch"]
    assert step == SWITCH_STEP and results[1]["switch"] == results[0]["switch"]
    trajectory, weights, others = reference_run((step, ranks))
    assert len({tuple(sorted(r.items())) for r in trajectory}) > 1, "the ranks must adapt after the switch"
    for r in results:
        assert r["trajectory"][step:] == trajectory, kind
        assert all(t == {} for t in r["trajectory"][:step - 1])  # dense until the switch
        for name, w in weights.items():
            assert torch.allclose(r["weights"][name].double(), w, atol=2e-5), (kind, name)
        for name, p in others.items():
            assert torch.allclose(r["others"][name].double(), p, atol=2e-5), (kind, name)


def test_the_users_own_hf_script_with_bf16_groups_scheduler_and_accumulation():
    """DLRT the way a user meets it: GPT-2 from transformers, `deepspeed_api.initialize` with bf16, ZeRO-2, two
    AdamW param groups, a LambdaLR and gradient accumulation. Both ranks take one rank trajectory; the bases stay
    orthonormal in fp32 to bf16's rounding (re-orthonormalized every step, not drifting); the engine's output is a
    plain-torch GPT-2 whose Conv1D weights are the layers' U S Vᵀ; the scheduler's lr is the user's formula."""
    from transformers.pytorch_utils import Conv1D

    from examples.hf_common import gpt2
    from tests.distributed.dlrt_workers import HF_STEPS, hf_dlrt_worker, hf_lr_factor

    r0, r1 = run_ranks(hf_dlrt_worker, world=2, timeout=280)
    assert r0["trajectory"] == r1["trajectory"] and len(r0["trajectory"]) == HF_STEPS
    assert r0["trajectory"][-1] != r0["trajectory"][0], "theta 0.3 must change ranks"
    assert r0["dtypes"] == ["torch.bfloat16"]
    for step, lrs in enumerate(r0["lrs"], start=1):
        assert lrs == pytest.approx([3e-3 * hf_lr_factor(step)] * 2)
    for name, f in r0["factors"].items():
        for leaf in ("u", "v"):
            gram = f[leaf].T @ f[leaf]
            # bf16 rounding alone leaves ~1.5e-3; stored bases used as if orthonormal drift past 6e-3 in 12 steps
            assert (gram - torch.eye(gram.shape[0])).abs().max() < 3e-3, (name, leaf)
    plain = gpt2()  # the same architecture in plain torch, weights from the run: W = U S Vᵀ per DLRT layer
    state = {k: v for k, v in r0["state"].items() if k.rsplit(".", 1)[-1] not in ("u", "s", "v", "k", "l")}
    for name, f in r0["factors"].items():
        state[f"{name}.weight"] = (f["u"] @ f["s"] @ f["v"].T).T  # Conv1D stores Wᵀ
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing)
    assert all(isinstance(plain.get_submodule(n), Conv1D) for n in r0["factors"])
    with torch.no_grad():
        expected = plain.to(torch.bfloat16)(input_ids=r0["probe"]).logits.float()
    assert (expected - r0["logits"]).abs().max() < 0.1 * expected.abs().max()
    assert sum(r0["losses"][-4:]) < sum(r0["losses"][:4])


@pytest.mark.parametrize("kind", ["fsdp2", "zero2"])
def test_adam_moments_rotate_alike_on_sharded_engines(kind):
    """With Adam, K, L, S's moments are rotated into the new bases at every step (and sliced at a shrink): on
    FSDP2's row shards and ZeRO-2's partitioned state they equal the one-process run's (LocalBackend, whose
    rotation the unit tests check against the formula), as do the weights and the rank trajectory."""
    reference = dlrt_worker(0, 1, "local", optimizer="adam")
    results = run_ranks(dlrt_worker, world=2, timeout=240, args=(kind, False, False, "adam"))
    assert len({tuple(sorted(r.items())) for r in reference["trajectory"]}) > 1
    for r in results:
        assert r["trajectory"] == reference["trajectory"], kind
        for name, w in reference["weights"].items():
            assert torch.allclose(r["weights"][name], w, atol=1e-4), (kind, name)
        for name, moments in reference["moments"].items():
            for key, value in moments.items():
                scale = float(value.abs().max())
                assert torch.allclose(r["moments"][name][key], value, atol=1e-3 * scale), (kind, name, key)
