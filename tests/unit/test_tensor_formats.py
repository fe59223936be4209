"""Tensor formats (issue 17): CP, Tucker, TT and TT-matrix matrices against oracles written here — one explicit
torch.einsum per format and shape, not formats.reconstruct — in float64; both Linear paths, the Embedding lookup,
pruning against masking, piecewise slice sums, the init variance, gradients, meta-device builds and spec errors."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dist_lowrank.methods.tensor import formats
from dist_lowrank.methods.tensor.formats import TensorSpec
from dist_lowrank.methods.tensor.layer import TensorizedEmbedding, TensorizedLinear
from dist_lowrank.reshape.change import slice_tensor

pytestmark = pytest.mark.unit
ATOL = 1e-5

# (format, case) -> (row_modes, col_modes, rank, the oracle's einsum over the cores in parameter order)
CASES = {
    ("cp", "2+2"): ((2, 3), (4, 2), 3, "ar,br,cr,dr->abcd"),
    ("cp", "3+2"): ((2, 2, 3), (3, 2), 3, "ar,br,cr,dr,er->abcde"),
    ("tucker", "2+2"): ((2, 3), (4, 2), 3, "ap,bq,cs,dt,pqst->abcd"),
    ("tucker", "3+2"): ((2, 2, 3), (3, 2), 2, "ap,bq,cs,dt,eu,pqstu->abcde"),
    ("tt", "2+2"): ((2, 3), (4, 2), 3, "xap,pbq,qcs,sdy->abcd"),
    ("tt", "3+2"): ((2, 2, 3), (3, 2), 3, "xap,pbq,qcs,sdt,tey->abcde"),
    ("ttm", "2+2"): ((2, 3), (4, 2), 3, "xacp,pbdy->abcd"),
    ("ttm", "3+3"): ((2, 3, 2), (2, 2, 3), 3, "xadp,pbeq,qcfy->abcdef"),
}


def make(fmt: str, case: str, seed: int = 0):
    rows_m, cols_m, rank, subscripts = CASES[(fmt, case)]
    rows, cols = torch.Size(rows_m).numel(), torch.Size(cols_m).numel()
    spec = formats.make_spec(fmt, rows, cols, rank, row_modes=rows_m, col_modes=cols_m)
    gen = torch.Generator().manual_seed(seed)
    cores = [torch.randn(s, generator=gen, dtype=torch.float64) for s in formats.core_shapes(spec)]
    return spec, cores, subscripts


def oracle(spec: TensorSpec, cores: list[torch.Tensor], subscripts: str) -> torch.Tensor:
    """The matrix from one einsum whose output lists the row modes, then the col modes (row-major reshape)."""
    return torch.einsum(subscripts, *cores).reshape(spec.rows, spec.cols)


ALL = sorted(CASES)


def test_core_shapes_and_ranks_are_as_documented():
    shapes = {fmt: formats.core_shapes(make(fmt, "2+2")[0]) for fmt in formats.FORMATS}
    assert shapes["cp"] == [(2, 3), (3, 3), (4, 3), (2, 3)]
    assert shapes["tucker"] == [(2, 2), (3, 3), (4, 3), (2, 2), (2, 3, 3, 2)]  # R_k clipped to m_k, core last
    assert shapes["tt"] == [(1, 2, 2), (2, 3, 3), (3, 4, 2), (2, 2, 1)]        # bonds ≤ min(left, right)
    assert shapes["ttm"] == [(1, 2, 4, 3), (3, 3, 2, 1)]
    spec = make("tt", "2+2")[0]
    assert formats.n_params(spec) == 4 + 18 + 24 + 4


@pytest.mark.parametrize("fmt,case", ALL)
def test_reconstruct_matches_the_oracle(fmt, case):
    spec, cores, subs = make(fmt, case)
    torch.testing.assert_close(formats.reconstruct(spec, cores), oracle(spec, cores, subs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("fmt,case", ALL)
@pytest.mark.parametrize("path", ["dense", "direct", None])
def test_linear_forward_on_each_path(fmt, case, path):
    spec, cores, subs = make(fmt, case, seed=1)
    layer = TensorizedLinear(spec.cols, spec.rows, spec, dtype=torch.float64)
    with torch.no_grad():
        for p, c in zip(layer.cores, cores):
            p.copy_(c)
    layer.path = path
    x = torch.randn(3, 4, spec.cols, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = x @ oracle(spec, cores, subs).T + layer.bias
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.weight_matrix(), oracle(spec, cores, subs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("fmt,case", ALL)
def test_embedding_lookup_is_the_oracle_row(fmt, case):
    spec, cores, subs = make(fmt, case, seed=3)
    layer = TensorizedEmbedding(spec.rows, spec.cols, spec, dtype=torch.float64)
    with torch.no_grad():
        for p, c in zip(layer.cores, cores):
            p.copy_(c)
    index = torch.cat([torch.randperm(spec.rows), torch.tensor([0, spec.rows - 1, 1])]).reshape(3, -1)
    torch.testing.assert_close(layer(index), oracle(spec, cores, subs)[index], atol=ATOL, rtol=0)


def test_flop_counts_by_hand():
    """cp (2,3)x(4,2), R=2, B=5: Khatri-Rao rows 2·3·2 = 12, cols 4·2·2 = 16; dense + W 6·8·2 + x W 5·6·8,
    direct + x·KR 5·8·2 + z·KRᵀ 5·2·6. ttm same modes, bond 3: the chain (8 × 3)·(3 × 6) = 144 + 5·48;
    direct 5·(1·1·4·2·3·2) + 5·(2·3·2·3·1·1)."""
    cp = TensorSpec("cp", (2, 3), (4, 2), (2,))
    assert formats.flops(cp, 5) == {"dense": 28 + 96 + 240, "direct": 28 + 80 + 60}
    ttm = TensorSpec("ttm", (2, 3), (4, 2), (3,))
    assert formats.flops(ttm, 5) == {"dense": 144 + 240, "direct": 240 + 180}
    assert formats.choose_path(cp, 5) == "direct" and formats.choose_path(ttm, 5) == "dense"
    big = formats.make_spec("tt", 1024, 1024, 8)  # a large compressed matrix: tiny batches skip building W
    assert formats.choose_path(big, 1) == "direct"


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_pruned_cores_equal_the_masked_cores(fmt):
    spec, cores, subs = make(fmt, "2+2", seed=4)
    groups = formats.rank_groups(spec)
    keep = [tuple(i for i in range(g.size) if i != g.size // 2) if g.size > 1 else (0,) for g in groups]
    assert any(len(k) < g.size for k, g in zip(keep, groups))
    masked = [c.clone() for c in cores]
    for g, k in zip(groups, keep):
        drop = [i for i in range(g.size) if i not in k]
        for core, dim in g.prune:
            masked[core].index_fill_(dim, torch.tensor(drop, dtype=torch.long), 0.0)
    new_spec, index = formats.pruned(spec, keep)
    sliced = [slice_tensor(c, idx) for c, idx in zip(cores, index)]
    assert [tuple(c.shape) for c in sliced] == formats.core_shapes(new_spec)
    assert new_spec.ranks == tuple(len(k) for k in keep)
    target = oracle(spec, masked, subs)
    torch.testing.assert_close(formats.reconstruct(new_spec, sliced), target, atol=1e-6, rtol=0)
    x = torch.randn(2, spec.cols, dtype=torch.float64)
    for path in formats.PATHS:
        torch.testing.assert_close(formats.apply(new_spec, sliced, x, path), x @ target.T, atol=1e-6, rtol=0)
    full, untouched = formats.pruned(spec, [tuple(range(g.size)) for g in groups])
    assert full == spec and all(i is None for idx in untouched for i in idx)


def test_slice_sums_and_counts():
    spec, cores, _ = make("tt", "2+2", seed=5)      # cores (1,2,2) (2,3,3) (3,4,2) (2,2,1)
    sq = [c.pow(2) for c in cores]
    expected = [sq[0].sum((0, 1)), sq[1].sum((0, 1)), sq[2].sum((0, 1)) + sq[3].sum((1, 2))]
    for got, want in zip(formats.slice_sums(spec, cores), expected):
        torch.testing.assert_close(got, want)
    assert formats.slice_counts(spec) == [2, 6, 12 + 2]
    spec, cores, _ = make("tucker", "2+2", seed=5)
    torch.testing.assert_close(formats.slice_sums(spec, cores)[2], cores[2].pow(2).sum(0))
    assert formats.slice_counts(spec) == [2, 3, 4, 2]
    spec, cores, _ = make("cp", "2+2", seed=5)
    torch.testing.assert_close(formats.slice_sums(spec, cores)[0], sum(c.pow(2).sum(0) for c in cores))
    assert formats.slice_counts(spec) == [2 + 3 + 4 + 2]
    groups = formats.rank_groups(make("ttm", "3+3")[0])
    assert [g.prior for g in groups] == [((0, 3),), ((1, 3), (2, 0))]
    assert [g.prune for g in groups] == [((0, 3), (1, 0)), ((1, 3), (2, 0))]


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_flat_slice_sums_over_three_pieces_add_up(fmt):
    spec, cores, _ = make(fmt, "3+2" if fmt != "ttm" else "3+3", seed=6)
    gen = torch.Generator().manual_seed(7)
    for core in cores:
        flat = core.reshape(-1)
        cuts = sorted(torch.randint(0, flat.numel() + 1, (2,), generator=gen).tolist())
        pieces = [(0, cuts[0]), (cuts[0], cuts[1]), (cuts[1], flat.numel())]
        for dim in range(core.dim()):
            whole = core.pow(2).sum([j for j in range(core.dim()) if j != dim])
            total = sum(formats.flat_slice_sums(core.shape, dim, a, flat[a:b], core.shape[dim]) for a, b in pieces)
            torch.testing.assert_close(total, whole)
    core = max(cores, key=torch.numel)
    for a, b in [(1, 2), (3, 3), (5, core.numel())]:  # odd ranges: one entry, empty, a tail
        dim = core.dim() - 2
        want = torch.zeros(core.numel(), dtype=core.dtype)
        want[a:b] = core.reshape(-1)[a:b]
        got = formats.flat_slice_sums(core.shape, dim, a, core.reshape(-1)[a:b], core.shape[dim])
        torch.testing.assert_close(got, want.reshape(core.shape).pow(2).sum(
            [j for j in range(core.dim()) if j != dim]))


def test_make_spec_modes_defaults_and_clipping():
    assert formats.auto_modes(784, 2) == (28, 28)
    assert formats.auto_modes(512, 3) == (8, 8, 8)
    assert formats.auto_modes(97, 3) == (97, 1, 1)
    assert formats.auto_modes(768, 2) == (32, 24)
    spec = formats.make_spec("tt", 784, 512, 4)
    assert (spec.row_modes, spec.col_modes, spec.order) == ((28, 28), (32, 16), 4)
    small = formats.make_spec("tt", 3, 64, 4)
    assert (small.row_modes, small.col_modes) == ((3,), (8, 8))      # a dimension < 4 keeps one mode
    assert formats.make_spec("ttm", 3, 64, 4).col_modes == (64,)    # ttm pairs modes
    assert formats.make_spec("ttm", 24, 30, 4, row_modes=(2, 3, 4)).col_modes == formats.auto_modes(30, 3)
    assert formats.make_spec("tucker", 6, 8, 100, (2, 3), (4, 2)).ranks == (2, 3, 4, 2)
    assert formats.make_spec("tt", 6, 8, 100, (2, 3), (4, 2)).ranks == (2, 6, 2)
    assert formats.make_spec("ttm", 6, 8, 100, (2, 3), (4, 2)).ranks == (6,)     # min(2·4, 3·2)
    assert formats.make_spec("cp", 6, 8, 100, (2, 3), (4, 2)).ranks == (100,)


def test_make_spec_errors_name_the_dimension():
    with pytest.raises(ValueError, match="unknown format"):
        formats.make_spec("hopf", 4, 4, 2)
    with pytest.raises(ValueError) as err:
        formats.make_spec("tt", 24, 30, 4, row_modes=(4, 5))
    msg = str(err.value)
    assert "rows = 24" in msg and "(4, 5)" in msg and "20" in msg and "\n" not in msg
    with pytest.raises(ValueError, match=r"col_modes \(5, 5\) multiply to 25, but cols = 30"):
        formats.make_spec("cp", 24, 30, 4, col_modes=(5, 5))
    with pytest.raises(ValueError, match="ttm needs as many row modes as col modes"):
        formats.make_spec("ttm", 24, 30, 4, row_modes=(4, 6), col_modes=(2, 3, 5))
    with pytest.raises(ValueError):
        TensorSpec("tt", (2, 3), (4, 2), (2, 2))  # tt with 4 modes has 3 bonds


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_init_std_gives_the_target_variance(fmt):
    spec = formats.make_spec(fmt, 64, 64, 8, (8, 8), (8, 8))
    target = 0.02
    std = formats.init_std(spec, target)
    draws = []
    for seed in range(200):  # products of Gaussians are heavy-tailed: 200 draws keep the mean within ~5%
        gen = torch.Generator().manual_seed(seed)
        cores = [torch.randn(s, generator=gen, dtype=torch.float64) * std for s in formats.core_shapes(spec)]
        draws.append(mean_square(spec, cores))
    assert abs(sum(draws) / len(draws) / target - 1) < 0.1


def mean_square(spec: TensorSpec, cores: list[torch.Tensor]) -> float:
    """Mean square (the variance: zero mean) of the matrix; `reconstruct` is checked against oracles above."""
    return formats.reconstruct(spec, cores).pow(2).mean().item()


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_backward_reaches_every_core(fmt):
    spec, cores, _ = make(fmt, "3+2" if fmt != "ttm" else "3+3", seed=8)
    for path in formats.PATHS:
        layer = TensorizedLinear(spec.cols, spec.rows, spec, dtype=torch.float64)
        layer.path = path
        layer(torch.randn(5, spec.cols, dtype=torch.float64)).square().sum().backward()
        for p in [*layer.cores, layer.bias]:
            assert p.grad is not None and p.grad.abs().sum() > 0
    emb = TensorizedEmbedding(spec.rows, spec.cols, spec, dtype=torch.float64)
    emb(torch.arange(spec.rows)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in emb.cores)


def test_layers_build_under_meta_and_round_trip_their_layout():
    spec = formats.make_spec("ttm", 24, 30, 4)
    with torch.device("meta"):
        lin = TensorizedLinear(30, 24, spec)
        emb = TensorizedEmbedding(24, 30, spec)
        y = lin(torch.empty(7, 30))
    assert all(p.is_meta for p in [*lin.parameters(), *emb.parameters()]) and y.shape == (7, 24)
    assert [n for n, _ in lin.named_parameters()] == ["core_0", "core_1", "bias"]
    entry = json.loads(json.dumps(lin.layout()))
    assert entry == lin.layout() == {"type": "tensor", "format": "ttm", "row_modes": list(spec.row_modes),
                                     "col_modes": list(spec.col_modes), "ranks": list(spec.ranks), "kind": "linear"}
    assert TensorizedLinear.from_layout(30, 24, entry, True, device="meta").spec == spec
    assert lin.with_layout(entry) is lin
    small, _ = formats.pruned(spec, [(0, 2)])
    with torch.device("meta"):
        pruned = lin.pruned_like(small, dtype=torch.float16)
        pruned_emb = emb.pruned_like(small)
    assert pruned.core_0.shape == (1, spec.row_modes[0], spec.col_modes[0], 2) and pruned.core_0.is_meta
    assert pruned.core_0.dtype == torch.float16 and pruned_emb.spec == small
    assert TensorizedEmbedding.from_layout(24, 30, json.loads(json.dumps(emb.layout())), device="meta").spec == spec
    assert lin.RESHAPE_ATTRS[0] == emb.RESHAPE_ATTRS[0] == "spec"


def test_from_dense_matches_the_dense_init_and_copies_the_bias():
    dense = nn.Linear(64, 48)
    spec = formats.make_spec("tt", 48, 64, 8)
    layer = TensorizedLinear.from_dense(dense, spec, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer.bias, dense.bias)
    std = formats.init_std(spec, 1.0 / (3 * 64))
    assert all(abs(c.std().item() / std - 1) < 0.35 for c in layer.cores if c.numel() > 30)
    with pytest.raises(ValueError, match="48x64"):
        TensorizedLinear.from_dense(nn.Linear(48, 64), spec)
    with pytest.raises(ValueError, match="padding_idx"):
        TensorizedEmbedding.from_dense(nn.Embedding(48, 64, padding_idx=0), spec)
    emb = TensorizedEmbedding.from_dense(nn.Embedding(48, 64), spec)
    assert emb(torch.tensor([[0, 47]])).shape == (1, 2, 64)
