"""Worker functions (module level, picklable) for the monitor and coordinator tests."""
from __future__ import annotations

import math

import torch

SHAPES = [(96, 64), (64, 96), (7, 33), (128, 128)]


def make_matrices(seed: int = 0) -> list[torch.Tensor]:
    """Identical on every process: random, low-rank + noise, and a decaying spectrum."""
    gen = torch.Generator().manual_seed(seed)
    mats = [torch.randn(*SHAPES[0], generator=gen)]
    a, b = torch.randn(SHAPES[1][0], 5, generator=gen), torch.randn(5, SHAPES[1][1], generator=gen)
    mats.append(a @ b + 0.01 * torch.randn(*SHAPES[1], generator=gen))
    mats.append(torch.randn(*SHAPES[2], generator=gen))
    q1, _ = torch.linalg.qr(torch.randn(128, 128, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(128, 128, generator=gen))
    mats.append(q1 @ torch.diag(torch.logspace(0, -3, 128)) @ q2)
    return mats


def views_for(layout: str, rank: int, world: int, mats: list[torch.Tensor]):
    """ShardViews of each matrix in the given layout, as a backend would produce them."""
    from dist_lowrank.shard_view import ShardView

    views = []
    for i, w in enumerate(mats):
        m, n = w.shape
        flat = w.reshape(-1)
        if layout == "replicated":
            views.append(ShardView(f"l{i}", (m, n), 0, flat, replicated=True))
        elif layout == "rows":  # FSDP2 Shard(0): ceil-sized row chunks, the last may be short or empty
            per = math.ceil(m / world)
            r0, r1 = min(m, rank * per), min(m, (rank + 1) * per)
            views.append(ShardView(f"l{i}", (m, n), r0 * n, flat[r0 * n: r1 * n]))
        elif layout == "flat":  # ZeRO-3: equal flat partitions, padding removed
            per = math.ceil(m * n / world)
            s0, s1 = min(m * n, rank * per), min(m * n, (rank + 1) * per)
            views.append(ShardView(f"l{i}", (m, n), s0, flat[s0:s1]))
    return views


def estimate_worker(rank: int, world: int, layout: str, method: str, steps: int):
    from dist_lowrank.monitor import RankMonitor

    monitor = RankMonitor(method, steps)
    res = monitor.estimate(views_for(layout, rank, world, make_matrices()))
    return {n: (r.value, r.status) for n, r in res.items()}, monitor.stats.bytes, monitor.stats.collectives


def early_stop_worker(rank: int, world: int, layout: str, rtol: float):
    """30 Lanczos steps at most, stopping once every layer settled to rtol (the votes ride on the steps'
    all-reduces): (results, Krylov steps run, collectives, bytes)."""
    from dist_lowrank.monitor import RankMonitor

    monitor = RankMonitor("lanczos", 30, rtol=rtol)
    res = monitor.estimate(views_for(layout, rank, world, make_matrices()))
    stats = monitor.stats
    return {n: (r.value, r.status) for n, r in res.items()}, stats.iterations, stats.collectives, stats.bytes


def degenerate_worker(rank: int, world: int):
    """Zero, NaN-on-one-rank's-shard and Inf layers under row sharding: named, identical results."""
    from dist_lowrank.monitor import RankMonitor
    from dist_lowrank.shard_view import ShardView

    zero = torch.zeros(8, 6)
    nan = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    nan[7, 5] = float("nan")  # lives on the last rank's rows only
    good = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    views = []
    for name, w in (("zero", zero), ("nan", nan), ("good", good)):
        r0, r1 = rank * 4, rank * 4 + 4
        views.append(ShardView(name, (8, 6), r0 * 6, w.reshape(-1)[r0 * 6: r1 * 6]))
    res = RankMonitor("lanczos", 20).estimate(views)
    return {n: (r.value if r.status == "ok" else r.status, r.status) for n, r in res.items()}


def agree_worker(rank: int, world: int, disagree: bool):
    """Each rank derives a plan; with disagree=True rank 1's differs. Returns the plan or the error."""
    from dist_lowrank.coordinator import Coordinator
    from dist_lowrank.errors import PlanMismatchError
    from dist_lowrank.plan import Plan

    ranks = {"a": 4, "b": 8}
    if disagree and rank == 1:
        ranks = {"a": 4, "b": 9}
    try:
        plan = Coordinator().agree(Plan("switch", 10, ranks))
        return ("ok", plan.to_json())
    except PlanMismatchError as exc:
        return ("PlanMismatchError", str(exc))


NEAR_THRESHOLD = [10.0, 10.0, 12.0, 12.5, 12.5, 12.5]  # srank of net.2 at steps 0 (init), 1, 2, ...


def near_threshold_worker(rank: int, world: int):
    """The real controller and Cuttlefish strategy on DDP, the monitor scripted: at step 3 the stable rank moves by
    exactly the threshold (0.5, not stable: `<`) on rank 0, and by 0.5 − 1e-7 (stable) on rank 1's copy. Returns
    the step each rank switched at, its ranks, and the step a strategy fed this rank's own values would switch at."""
    from types import SimpleNamespace

    from dist_lowrank.backends.ddp_backend import DDPBackend
    from dist_lowrank.config import LowRankConfig
    from dist_lowrank.config_io import dataclass_from_dict
    from dist_lowrank.controller import LowRankController
    from dist_lowrank.methods.cuttlefish.rule import CuttlefishStrategy
    from tests.distributed.switch_common import local_batch, loss_fn, make_model

    cfg = dataclass_from_dict(LowRankConfig, {
        "strategy": "cuttlefish", "target_modules": ["net.2"], "monitor": {"cadence_steps": 1},
        "cuttlefish": {"ema_window": 1, "last_k": 1, "threshold": 0.5, "relax_threshold": False, "rank_rule": "raw"},
        "switch": {"profile_layers": False}}, "lowrank")
    mine = [v - (1e-7 if rank == 1 and i == 3 else 0.0) for i, v in enumerate(NEAR_THRESHOLD)]
    backend = DDPBackend(make_model(), lambda p: torch.optim.SGD(p, lr=0.01))
    controller = LowRankController(backend, cfg)
    calls = iter(mine)
    controller.monitor.estimate = lambda views: {v.name: SimpleNamespace(value=next(calls)) for v in views}
    controller.start()
    switched = None
    for step in range(1, len(mine)):
        loss = loss_fn(backend.model, local_batch(step, rank, world))
        backend.backward(loss)
        backend.step()
        plan = controller.after_step(step, float(loss.detach()))
        if plan is not None and switched is None:
            switched = (step, dict(plan.ranks))
    alone = CuttlefishStrategy(cfg.cuttlefish, {"net.2": (40, 48)})
    alone_step = next(step for step, value in enumerate(mine) if alone.observe(step, {"net.2": value}) is not None)
    return switched, alone_step


def failure_worker(rank: int, world: int):
    """Rank 1 fails inside a phase; every rank must raise RemoteRankError naming rank 1."""
    from dist_lowrank.coordinator import Coordinator
    from dist_lowrank.errors import RemoteRankError

    error = ValueError("injected factorization failure") if rank == 1 else None
    try:
        Coordinator().raise_if_any_failed(error, "switch")
        return ("ok", "")
    except RemoteRankError as exc:
        return ("RemoteRankError", str(exc))


def profiling_worker(rank: int, world: int):
    """Keep-dense decisions from timings: each rank times on its own, the decision must be shared."""
    import torch
    from torch import nn

    from dist_lowrank.plan import Plan
    from dist_lowrank.profiling import keep_dense_where_not_faster

    torch.manual_seed(0)
    modules = {"a": nn.Linear(256, 256), "b": nn.Linear(64, 64), "c": nn.Conv2d(16, 32, 3, padding=1)}
    shapes = {"a": (32, 256), "b": (32, 64), "c": (4, 16, 12, 12)}
    plan = Plan("switch", 5, {"a": 32, "b": 30, "c": 8})
    filtered, table = keep_dense_where_not_faster(plan, modules, shapes, iters=3, min_speedup=1.0,
                                                  device=torch.device("cpu"))
    return filtered.to_json(), table


def spectrum_worker(rank: int, world: int, layout: str):
    """σ(U[:, :k] V[:, :k]ᵀ) from shard views of tall factors (rows / ZeRO-3 flat / replicated)."""
    import torch

    from dist_lowrank.methods.inrank.spectrum import lowrank_singular_values

    gen = torch.Generator().manual_seed(5)
    u, v = torch.randn(37, 12, generator=gen), torch.randn(29, 12, generator=gen)
    u2, v2 = torch.randn(8, 16, generator=gen), torch.randn(50, 16, generator=gen)
    u_views = views_for(layout, rank, world, [u, u2])
    v_views = views_for(layout, rank, world, [v, v2])
    values, stats = lowrank_singular_values(u_views, v_views, [9, 5])
    return [x.tolist() for x in values], stats.bytes, stats.collectives
