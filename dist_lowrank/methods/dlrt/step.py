"""One integrator step of every DLRT layer on an engine (collective, every rank in the same order).

Where the engine splits parameters into row blocks (`engine.row_shard`, FSDP2) each layer's augmented core is
built from this rank's rows (`rows.py`: projections, CholeskyQR2 and the core's blocks as sums of row-block
products, one all-reduce per phase for all layers; only S, c×c, is gathered); elsewhere from the full factors
(`engine.gather`: a no-op for replicas, ZeRO-3's gather) with `integrator.py`. Every core's SVD and truncation
rank are then rank 0's, in one broadcast for all layers, so the decision is identical even where replicas differ
in the last bits; the new U, S, V, K = U S, L = V S and the rotated (or reset) moments of K, L, S are written back
(`engine.write`, or `engine.write_rows` for row blocks). Bases stored in half precision are re-orthonormalized
in fp32 first. The bytes the step sends across ranks are counted (`bytes`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from dist_lowrank.methods.dlrt import integrator, rows
from dist_lowrank.methods.dlrt.layer import DLRTLinear
from dist_lowrank.methods.dlrt.model import max_rank_of
from dist_lowrank.reshape.change import ParamChange, Rotate, state_of

LEAVES = ("u", "v", "s", "k", "l")


def _pad(matrix: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = matrix.new_zeros(rows, cols)
    out[: matrix.shape[0], : matrix.shape[1]] = matrix
    return out


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _half(layer: DLRTLinear) -> bool:
    return layer.u.dtype in (torch.float16, torch.bfloat16)


def _placed(rows: torch.Tensor, first: int, total: int) -> torch.Tensor:
    """This rank's rows at their place in a zero (total × cols) matrix: summed over the ranks, the whole matrix."""
    out = rows.new_zeros(total, rows.shape[1])
    out[first: first + rows.shape[0]] = rows
    return out


@dataclass
class _Pending:
    """One layer between its augmented core and the agreed truncation: the bases as this rank holds them (all
    rows, or its row block)."""

    name: str
    layer: DLRTLinear
    core: torch.Tensor
    u_aug: torch.Tensor
    v_aug: torch.Tensor
    by_rows: bool


class IntegratorStep:
    """The integrator's step over `names` on `engine`; `run` returns {layer: (rank, wanted rank, capacity)}."""

    def __init__(self, cfg: Any, dims: dict[str, tuple[int, int]], engine: Any, coordinator: Any) -> None:
        self.cfg, self.dims, self.engine, self.coordinator = cfg, dims, engine, coordinator
        self._world = coordinator.world_size
        self.bytes = 0          # this rank's payload in the step's collectives
        self.by_rows = False

    def run(self, names: list[str], layers: dict[str, DLRTLinear]) -> dict[str, tuple[int, int, int]]:
        self.by_rows = bool(names) and all(self.engine.row_shard(layers[n].u) is not None for n in names)
        pending = (self._prepare_rows(names, layers) if self.by_rows
                   else [self._prepare_full(n, layers[n]) for n in names])
        return {item.name: self._finish(item, agreed) for item, agreed in zip(pending, self._agree(pending))}

    def _prepare_full(self, name: str, layer: DLRTLinear) -> _Pending:
        """One layer's augmented core from its full factors (gathered where sharded; replicas use their own)."""
        engine, coordinator = self.engine, self.coordinator
        r = layer.rank
        full = {leaf: _at_least_fp32(engine.gather(getattr(layer, leaf))) for leaf in LEAVES}  # QR, SVD in fp32+
        self._count(engine.shards_parameters, sum(t.numel() for t in full.values()) * layer.s.element_size())
        u, v = full["u"][:, :r], full["v"][:, :r]
        if _half(layer):
            u, v = integrator.reorthonormalize(u), integrator.reorthonormalize(v)
        k1, l1, s1 = full["k"][:, :r], full["l"][:, :r], full["s"][:r, :r]
        u_new, v_new = integrator.new_directions(u, k1), integrator.new_directions(v, l1)
        cross = None
        if self.cfg.dlrt.integrator == "kls":
            local = layer.cross_block(u_new, v_new)
            cross = self._cross(engine, layer, coordinator.mean_tensor(local))
            self._count(True, _nbytes(local))
        core = integrator.augmented_core(k1, l1, s1, u_new, v_new, cross)
        return _Pending(name, layer, core, torch.cat([u, u_new], 1), torch.cat([v, v_new], 1), by_rows=False)

    def _prepare_rows(self, names: list[str], layers: dict[str, DLRTLinear]) -> list[_Pending]:
        """Every layer's augmented core from this rank's rows (FSDP2): U, V, K, L stay sharded; the sums the step
        needs are batched over all layers into a few all-reduces (methods.dlrt.rows); only S (c×c) is gathered."""
        engine, coordinator = self.engine, self.coordinator

        def reduce(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            self._count(True, sum(_nbytes(t) for t in tensors))
            return coordinator.sum_tensors(tensors)

        held = {n: {leaf: engine.row_shard(getattr(layers[n], leaf)) for leaf in ("u", "k", "v", "l")}
                for n in names}
        rank_of = {n: layers[n].rank for n in names}
        block = {n: {leaf: _at_least_fp32(rows[:, :rank_of[n]]) for leaf, (rows, _) in held[n].items()}
                 for n in names}
        cores_s = {}
        for n in names:
            s_full = engine.gather(layers[n].s)
            self._count(engine.shards_parameters, _nbytes(s_full))
            cores_s[n] = _at_least_fp32(s_full)[:rank_of[n], :rank_of[n]]
        half = [n for n in names if _half(layers[n])]
        if half:
            fixed = rows.reorthonormalize([block[n][leaf] for n in half for leaf in ("u", "v")], reduce)
            for i, n in enumerate(half):
                block[n]["u"], block[n]["v"] = fixed[2 * i], fixed[2 * i + 1]
        widths_u = [min(rank_of[n], self.dims[n][0] - rank_of[n]) for n in names]
        widths_v = [min(rank_of[n], self.dims[n][1] - rank_of[n]) for n in names]
        u_new = rows.new_directions([block[n]["u"] for n in names], [block[n]["k"] for n in names], widths_u, reduce)
        v_new = rows.new_directions([block[n]["v"] for n in names], [block[n]["l"] for n in names], widths_v, reduce)
        k1, l1 = [block[n]["k"] for n in names], [block[n]["l"] for n in names]
        top_right, bottom_left = rows.core_blocks(k1, l1, u_new, v_new, reduce)
        crosses: list[Optional[torch.Tensor]] = [None] * len(names)
        if self.cfg.dlrt.integrator == "kls":  # the batch's activations need whole Ũ, Ṽ: summed from row blocks
            def whole(parts, leaf):
                return [_placed(part, held[n][leaf][1], self.dims[n][0 if leaf == "u" else 1])
                        for n, part in zip(names, parts)]
            fulls = reduce(whole(u_new, "u") + whole(v_new, "v"))
            local = [layers[n].cross_block(fulls[i], fulls[len(names) + i]) for i, n in enumerate(names)]
            crosses = [self._cross(engine, layers[n], c / self._world) for n, c in zip(names, reduce(local))]
        out = []
        for i, n in enumerate(names):
            core = integrator.augmented_core(k1[i], l1[i], cores_s[n], u_new[i], v_new[i], crosses[i],
                                             top_right=top_right[i], bottom_left=bottom_left[i])
            out.append(_Pending(n, layers[n], core, torch.cat([block[n]["u"], u_new[i]], 1),
                                torch.cat([block[n]["v"], v_new[i]], 1), by_rows=True))
        return out

    def _agree(self, pending: list[_Pending]) -> list[tuple]:
        """Every core's SVD and truncation rank, rank 0's on every rank, in one broadcast for all layers (the
        decision is identical even where replicas differ in the last bits)."""
        cfg, packed, shapes = self.cfg.dlrt, [], []
        for item in pending:
            p, sigma, qh = torch.linalg.svd(item.core)
            top = max_rank_of(self.cfg, *self.dims[item.name])
            wanted = integrator.truncation_rank(sigma, cfg.theta, cfg.absolute, cfg.min_rank, top)
            packed.append(torch.cat([p.reshape(-1), sigma, qh.reshape(-1), sigma.new_tensor([float(wanted)])]))
            shapes.append(item.core.shape)
        if not packed:
            return []
        flat = self.coordinator.broadcast_tensor(torch.cat(packed))
        self._count(True, _nbytes(flat))
        out, start = [], 0
        for a, b in shapes:
            k = min(a, b)
            p, sigma = flat[start: start + a * a].reshape(a, a), flat[start + a * a: start + a * a + k]
            qh = flat[start + a * a + k: start + a * a + k + b * b].reshape(b, b)
            wanted = int(flat[start + a * a + k + b * b])
            out.append(((p, sigma, qh), wanted))
            start += a * a + k + b * b + 1
        return out

    def _finish(self, item: _Pending, agreed: tuple) -> tuple[int, int, int]:
        (svd, wanted), layer = agreed, item.layer
        r, c = layer.rank, layer.capacity
        rank = min(wanted, c)
        result = integrator.truncate(item.core, item.u_aug, item.v_aug, r, rank, svd=svd, wanted=wanted)
        self._write(layer, result, c, item.by_rows)
        layer.set_rank(rank)
        return rank, wanted, c

    def _write(self, layer: DLRTLinear, result: "integrator.Truncated", c: int, by_rows: bool) -> None:
        """New U, V, S, K = U S, L = V S at capacity c; moments of K, L, S rotated into the new coordinates. By
        rows: U, V, K, L and their moments are this rank's rows (no communication); S is written whole."""
        rows_u, rows_v = result.u.shape[0], result.v.shape[0]
        values = {"u": _pad(result.u, rows_u, c), "v": _pad(result.v, rows_v, c), "s": _pad(result.s, c, c),
                  "k": _pad(result.u @ result.s, rows_u, c), "l": _pad(result.v @ result.s, rows_v, c)}
        left, right = _pad(result.left, c, c), _pad(result.right, c, c)  # old coordinates -> new (zeros past r)
        rotations = {"k": Rotate("k", None, right), "l": Rotate("l", None, left), "s": Rotate("s", left.T, right)}
        engine = self.engine
        for leaf, value in values.items():
            param = getattr(layer, leaf)
            local = by_rows and leaf != "s"
            state = None
            if leaf in rotations:
                old = engine.local_state(param) if local else engine.full_state(param)
                if old:
                    moments = {k: t for k, t in old.items() if isinstance(t, torch.Tensor) and t.dim() > 0}
                    if self.cfg.dlrt.moments == "rotate":
                        new = state_of(ParamChange(rotations[leaf]), {leaf: moments}, tuple(value.shape))
                    else:
                        new = {k: torch.zeros_like(t) for k, t in moments.items()}
                    state = {k: t for k, t in (new or {}).items() if isinstance(t, torch.Tensor) and t.dim() > 0}
                    if not local:
                        self._count(engine.shards_optimizer_state, sum(_nbytes(t) for t in moments.values()))
            if local:
                engine.write_rows(param, value, state)
            else:
                engine.write(param, value, state)

    def _count(self, communicated: bool, nbytes: int) -> None:
        """Add a collective's payload to this step's integrator bytes: only where it crosses ranks (a gather of
        a replicated parameter, or anything on one process, moves nothing)."""
        if communicated and self._world > 1:
            self.bytes += int(nbytes)

    def _cross(self, engine: Any, layer: DLRTLinear, mean: torch.Tensor) -> torch.Tensor:
        """KLS's fourth core block −λ ŨᵀGṼ from the ranks' mean of the recorded products: unscaled by the fp16 loss
        scale the backward ran with (the records hold scaled output gradients), zero if not finite."""
        block = -self._lr_of(engine, layer.s) * mean / engine.backward_scale()
        return block if bool(torch.isfinite(block).all()) else torch.zeros_like(block)

    @staticmethod
    def _lr_of(engine: Any, param: torch.Tensor) -> float:
        """The current lr of the param group that holds `param` (the first group where the engine keeps flat
        partitions instead of the parameters: ZeRO)."""
        groups = engine.optimizer.param_groups
        for group in groups:
            if any(p is param for p in group["params"]):
                return float(group["lr"])
        return float(groups[0]["lr"])
