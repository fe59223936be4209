"""Shard-aware stable-rank monitor: estimates from the pieces each rank already holds.

- Sharded weights (FSDP2 row shards, ZeRO-3 flat partitions): ‖W‖_F² is a sum of local squares;
  σ_max comes from a Krylov method whose matrix-vector products are computed on the local piece and
  summed with one all-reduce of the concatenated vectors of *all* layers per iteration. Where every
  rank holds whole rows (FSDP2 always; ZeRO-3 when no partition boundary cuts a row), Lanczos runs
  on WᵀW = Σ_ranks W_rᵀW_r: one all-reduce of n-vectors per step. A layer whose rows are cut uses
  Golub–Kahan on W: two all-reduces (m- and n-vectors) per step. Bytes per estimate are
  O(steps · Σ(m+n)), never O(Σ m·n): no rank gathers a weight.
- Replicated weights (DDP, ZeRO-1/2): layers are spread over ranks (largest first, to the least
  loaded rank); each owner computes its layers alone and one all-reduce shares the results.
Every rank ends with the same numbers; the coordinator still broadcasts rank 0's copy before a
strategy sees them, so decisions never depend on per-rank floating-point noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from dist_lowrank.device import comm_device, is_distributed
from dist_lowrank.errors import ConfigError
from dist_lowrank.linalg import SrankResult, sigma_max_batched, sigma_max_gram, stable_rank
from dist_lowrank.shard_view import ShardView, row_runs

_STATUS_CODES = {"ok": 0.0, "zero": 1.0, "nonfinite": 2.0}
# Up to this world size, a gloo sum is an all-gather + local sum: latency-bound vectors, (p-1)·n bytes per rank
# instead of the ring's 2(p-1)/p·n (equal at p = 2). NCCL, or more ranks, use all_reduce.
GATHER_SUM_MAX_WORLD = 2
_CODE_STATUS = {v: k for k, v in _STATUS_CODES.items()}


class _LocalPiece:
    """Products of a rank's piece with vectors, as zero-padded full-length partial results."""

    def __init__(self, view: ShardView, dtype: torch.dtype) -> None:
        self.m, self.n = view.dims
        self.values = view.local_flat.detach().reshape(-1).to(dtype)
        self.runs = row_runs(view.flat_offset, self.values.numel(), self.n)
        # whole-row runs as (count × n) views, made once: the Gram product runs every Krylov step
        self.blocks = [self.values[start: start + count * self.n].view(count, self.n)
                       for _, col, start, count in self.runs if col < 0]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.m, dtype=v.dtype, device=v.device)
        for row, col, start, count in self.runs:
            if col < 0:
                block = self.values[start: start + count * self.n].view(count, self.n)
                out[row: row + count] += block @ v
            else:
                out[row] += self.values[start: start + count] @ v[col: col + count]
        return out

    @property
    def whole_rows(self) -> bool:
        """True when this rank's piece cuts no row (then WᵀW is a sum of local Grams)."""
        return all(col < 0 for _, col, _, _ in self.runs)

    def gram(self, v: torch.Tensor) -> torch.Tensor:
        """W_rᵀ (W_r v) for a piece of whole rows: this rank's share of WᵀW v."""
        if len(self.blocks) == 1:
            return self.blocks[0].T @ (self.blocks[0] @ v)
        out = torch.zeros(self.n, dtype=v.dtype, device=v.device)
        for block in self.blocks:
            out += block.T @ (block @ v)
        return out

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.n, dtype=u.dtype, device=u.device)
        for row, col, start, count in self.runs:
            if col < 0:
                block = self.values[start: start + count * self.n].view(count, self.n)
                out += block.T @ u[row: row + count]
            else:
                out[col: col + count] += self.values[start: start + count] * u[row]
        return out


@dataclass
class MonitorStats:
    """What the last estimate cost: collectives issued and payload bytes this rank sent into them."""

    collectives: int = 0
    bytes: int = 0
    iterations: int = 0  # Krylov steps run on sharded layers, both kinds (≤ steps each when rtol > 0)


class RankMonitor:
    """Estimate stable ranks of many layers at once, identically on every rank."""

    def __init__(self, method: str = "lanczos", steps: int = 20, group: Optional[dist.ProcessGroup] = None,
                 rtol: float = 0.0, seed: int = 0) -> None:
        """seed: the Krylov start vectors' seed (the plugin's `lowrank.seed`)."""
        if method not in ("lanczos", "power", "exact"):
            raise ValueError(f"monitor.method: got {method!r}; allowed: lanczos, power, exact")
        if not 0.0 <= rtol < 1.0:
            raise ValueError(f"monitor.rtol: got {rtol!r}; allowed: a number in [0, 1)")
        self.method, self.steps, self.group, self.rtol, self.seed = method, steps, group, rtol, int(seed)
        self._vote, self._agreed = 0.0, False
        self.stats = MonitorStats()

    # -- collectives (counted) -------------------------------------------------------------------
    def _all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (or `op`) over ranks; identical bits on every rank. Counted: one collective, the input's bytes."""
        if not is_distributed():
            return tensor
        device = comm_device()
        moved = tensor.to(device)
        op = op or dist.ReduceOp.SUM
        world = dist.get_world_size(self.group)
        if op == dist.ReduceOp.SUM and world <= GATHER_SUM_MAX_WORLD and dist.get_backend(self.group) == "gloo":
            # gloo's all_reduce of a few-KB vector costs ~2 ms of fixed latency here, its all-gather ~0.7 ms
            # with the same bytes per rank at p = 2 (tools/bench_monitor.py): gather, then sum in rank order.
            gathered = torch.empty(world * moved.numel(), dtype=moved.dtype, device=device)
            dist.all_gather_into_tensor(gathered, moved.reshape(-1), group=self.group)
            moved = gathered.view(world, -1).sum(dim=0).view(moved.shape)
        else:
            dist.all_reduce(moved, op=op, group=self.group)
        self.stats.collectives += 1
        self.stats.bytes += tensor.numel() * tensor.element_size()
        return moved.to(tensor.device)

    # -- public API -------------------------------------------------------------------------------
    def estimate(self, views: list[ShardView]) -> dict[str, SrankResult]:
        """Stable rank of every viewed layer; collective when a process group is initialized."""
        self.stats = MonitorStats()
        replicated = [v for v in views if v.replicated or not is_distributed()]
        sharded = [v for v in views if not (v.replicated or not is_distributed())]
        results: dict[str, SrankResult] = {}
        results.update(self._estimate_replicated(replicated))
        results.update(self._estimate_sharded(sharded))
        return {v.name: results[v.name] for v in views}

    def _estimate_replicated(self, views: list[ShardView]) -> dict[str, SrankResult]:
        if not views:
            return {}
        world = dist.get_world_size(self.group) if is_distributed() else 1
        me = dist.get_rank(self.group) if is_distributed() else 0
        owners = spread_by_cost([v.dims[0] * v.dims[1] for v in views], world)
        table = torch.zeros(len(views), 4, dtype=torch.float64)
        for i, view in enumerate(views):
            if owners[i] != me:
                continue
            matrix = view.local_flat.detach().reshape(view.dims)
            res = stable_rank(matrix, method=self.method, steps=self.steps, rtol=self.rtol, seed=self.seed)
            table[i] = torch.tensor([res.value, res.fro_sq, res.sigma_max, _STATUS_CODES[res.status]],
                                    dtype=torch.float64)  # a float32 row would cut every value to 7 digits
        table = torch.nan_to_num(table, nan=0.0) if world > 1 else table
        table = self._all_reduce(table)
        return {v.name: _result_from_row(table[i]) for i, v in enumerate(views)}

    def _estimate_sharded(self, views: list[ShardView]) -> dict[str, SrankResult]:
        if not views:
            return {}
        if self.method == "exact":  # every rank holds the same views: every rank raises this same line
            raise ConfigError("lowrank.monitor.method: 'exact' needs whole weights, and these layers are sharded "
                              f"({', '.join(v.name for v in views[:3])}{', ...' if len(views) > 3 else ''}; "
                              "FSDP2 row shards / ZeRO-3 partitions are never gathered); allowed there: lanczos, power")
        dtype = torch.float64
        pieces = [_LocalPiece(v, dtype) for v in views]
        device = pieces[0].values.device  # Krylov vectors live with the shards they multiply (CUDA under NCCL)
        # One all-reduce: squared norms, non-finite counts and cut-row counts of every layer.
        local = torch.zeros(3 * len(views), dtype=dtype, device=device)
        for i, piece in enumerate(pieces):
            finite = bool(torch.isfinite(piece.values).all())
            local[3 * i] = piece.values.square().sum() if finite else 0.0
            local[3 * i + 1] = 0.0 if finite else 1.0
            local[3 * i + 2] = 0.0 if piece.whole_rows else 1.0
        reduced = self._all_reduce(local)
        fro = [float(reduced[3 * i]) for i in range(len(views))]
        bad = [float(reduced[3 * i + 1]) > 0 for i in range(len(views))]
        active = [i for i in range(len(views)) if not bad[i] and fro[i] > 0.0]
        rows = [i for i in active if float(reduced[3 * i + 2]) == 0.0]  # no rank cuts a row
        cut = [i for i in active if float(reduced[3 * i + 2]) > 0.0]
        method = self.method
        sigmas = {**self._sigmas_gram(pieces, views, rows, method), **self._sigmas_gkl(pieces, views, cut, method)}
        out: dict[str, SrankResult] = {}
        for i, view in enumerate(views):
            if bad[i]:
                out[view.name] = SrankResult(math.nan, math.nan, math.nan, "nonfinite")
            elif fro[i] == 0.0:
                out[view.name] = SrankResult(0.0, 0.0, 0.0, "zero")
            else:
                s = sigmas[i]
                out[view.name] = SrankResult(fro[i] / (s * s), fro[i], s, "ok")
        return out

    def _with_vote(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """All-reduce a step's vectors; with rtol > 0 one extra slot carries each rank's stop vote, so the
        collective early-stop decision costs no collective of its own (it lags one step)."""
        if self.rtol <= 0.0:
            return self._all_reduce(torch.cat(parts))
        vote = torch.tensor([self._vote], dtype=parts[0].dtype, device=parts[0].device)
        reduced = self._all_reduce(torch.cat(parts + [vote]))
        world = dist.get_world_size(self.group) if is_distributed() else 1
        self._agreed = float(reduced[-1]) >= world
        return reduced[:-1]

    def _agree(self, settled: bool) -> bool:
        """Krylov's stop hook: record this rank's vote for the next all-reduce; answer with the vote all
        ranks cast one step earlier (identical on every rank, so every rank stops at the same step)."""
        self._vote = 1.0 if settled else 0.0
        return self._agreed

    def _reset_votes(self) -> None:
        self._vote, self._agreed = 0.0, False

    def _sigmas_gram(self, pieces: list[_LocalPiece], views: list[ShardView], chosen: list[int],
                     method: str) -> dict[int, float]:
        """σ_max of whole-row layers: Lanczos on WᵀW, one all-reduce of n-vectors per step."""
        if not chosen:
            return {}
        ns = [views[i].dims[1] for i in chosen]

        def apply_g(vs: list[torch.Tensor]) -> list[torch.Tensor]:
            self.stats.iterations += 1
            parts = [pieces[i].gram(v.to(pieces[i].values.dtype)) for i, v in zip(chosen, vs)]
            return self._split(self._with_vote(parts), ns)

        self._reset_votes()
        values = sigma_max_gram(apply_g, ns, method=method, steps=self.steps, rtol=self.rtol, agree=self._agree,
                                seed=self.seed, device=pieces[chosen[0]].values.device)
        return dict(zip(chosen, values))

    def _sigmas_gkl(self, pieces: list[_LocalPiece], views: list[ShardView], chosen: list[int],
                    method: str) -> dict[int, float]:
        """σ_max of layers with cut rows: Golub–Kahan on W, all-reduces of m- and n-vectors per step."""
        if not chosen:
            return {}
        dims = [views[i].dims for i in chosen]

        def apply_a(vs: list[torch.Tensor]) -> list[torch.Tensor]:
            self.stats.iterations += 1
            parts = [pieces[i].matvec(v.to(pieces[i].values.dtype)) for i, v in zip(chosen, vs)]
            return self._split(self._with_vote(parts), [d[0] for d in dims])

        def apply_at(us: list[torch.Tensor]) -> list[torch.Tensor]:
            parts = [pieces[i].rmatvec(u.to(pieces[i].values.dtype)) for i, u in zip(chosen, us)]
            return self._split(self._all_reduce(torch.cat(parts)), [d[1] for d in dims])

        self._reset_votes()
        values = sigma_max_batched(apply_a, apply_at, dims, method=method, steps=self.steps, rtol=self.rtol,
                                   agree=self._agree, seed=self.seed, device=pieces[chosen[0]].values.device)
        return dict(zip(chosen, values))

    @staticmethod
    def _split(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        return list(torch.split(flat, sizes))


def spread_by_cost(costs: list[int], world: int) -> list[int]:
    """Owner rank per item: largest cost first, each to the least-loaded rank (ties → lowest rank)."""
    load = [0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        target = min(range(world), key=lambda r: (load[r], r))
        owners[i] = target
        load[target] += costs[i]
    return owners


def _result_from_row(row: torch.Tensor) -> SrankResult:
    status = _CODE_STATUS[float(row[3])]
    if status == "nonfinite":
        return SrankResult(math.nan, math.nan, math.nan, status)
    return SrankResult(float(row[0]), float(row[1]), float(row[2]), status)
