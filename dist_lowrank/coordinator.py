"""One decision for all ranks.

Strategies run on values that are identical on every rank (rank 0's copy, broadcast), and the plan
each rank derives is checked by comparing SHA-256 digests gathered from every rank. A mismatch raises
`PlanMismatchError` on every rank in the same collective — nobody is left waiting in a later one.
Local failures in a phase can be shared with `raise_if_any_failed`, so one rank's exception ends every
rank with a named error instead of a hang.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from dist_lowrank.device import comm_device, is_distributed
from dist_lowrank.errors import PlanMismatchError, RemoteRankError, StragglerError
from dist_lowrank.plan import Plan

NO_PLAN = "no-plan"


class Coordinator:
    """Broadcast inputs, verify outputs: the same plan on every rank or the same error on every rank."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self._monitor_group: Optional[dist.ProcessGroup] = None  # gloo, for monitored_barrier (created on demand)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if is_distributed() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if is_distributed() else 1

    def broadcast_values(self, values: dict[str, float]) -> dict[str, float]:
        """Rank 0's values for the same (sorted) keys on every rank; NaN survives as NaN."""
        if not is_distributed():
            return dict(values)
        names = sorted(values)
        tensor = torch.tensor([values[n] for n in names], dtype=torch.float64, device=comm_device())
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        return {n: float(v) for n, v in zip(names, tensor.cpu().tolist())}

    def broadcast_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor (same shape and dtype on every rank) on every rank, on the tensor's own device: small
        results that must be identical everywhere (a core's SVD, a truncation rank)."""
        if not is_distributed():
            return tensor
        buf = tensor.detach().to(comm_device()).contiguous()
        dist.broadcast(buf, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        return buf.to(tensor.device)

    def mean_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over the ranks (the average the engines take of gradients)."""
        if not is_distributed():
            return tensor
        return self.sum_tensors([tensor])[0] / self.world_size

    def sum_tensors(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor summed over the ranks, in one all-reduce of their concatenation (small products of row
        shards, many layers at once); dtypes are promoted to one for the trip and restored."""
        if not is_distributed() or not tensors:
            return list(tensors)
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        buf = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors]).to(comm_device())
        dist.all_reduce(buf, group=self.group)
        out, start = [], 0
        for t in tensors:
            out.append(buf[start: start + t.numel()].reshape(t.shape).to(device=t.device, dtype=t.dtype))
            start += t.numel()
        return out

    def agree(self, plan: Optional[Plan]) -> Optional[Plan]:
        """Return the plan if every rank holds the same one (or none); else PlanMismatchError everywhere."""
        digest = plan.digest() if plan is not None else NO_PLAN
        if not is_distributed():
            return plan
        digests: list[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(digests, digest, group=self.group)
        if len(set(digests)) != 1:
            groups: dict[str, list[int]] = {}
            for r, d in enumerate(digests):
                groups.setdefault(str(d)[:12], []).append(r)
            detail = "; ".join(f"ranks {rs} -> {d}" for d, rs in sorted(groups.items(), key=lambda kv: kv[1]))
            raise PlanMismatchError(f"ranks disagree on the plan at step {plan.step if plan else '?'}: {detail}")
        return plan

    def raise_if_any_failed(self, error: Optional[BaseException], phase: str) -> None:
        """Collective: if any rank passes an error, every rank raises a named error about it (the failing
        ranks and the first one's cause). The common case costs one all-reduce of a flag; the messages are
        gathered only when something failed."""
        if not is_distributed():
            if error is not None:
                raise error
            return
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if not int(flag.item()):
            return
        messages: list[Optional[str]] = [None] * self.world_size
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(messages, mine, group=self.group)
        failed = {r: m for r, m in enumerate(messages) if m is not None}
        message = f"{phase} failed on rank(s) {sorted(failed)}: {failed[min(failed)]}"
        if error is not None:
            raise RemoteRankError(message) from error
        raise RemoteRankError(message)

    @contextmanager
    def shared_failure(self, phase: str) -> Iterator[None]:
        """Collective: run a *local* stretch of work (no collectives inside) and agree at its end whether it
        succeeded everywhere, so a rank that fails there cannot leave the others blocked in the next
        collective: every rank raises the same RemoteRankError naming the failing rank and its cause."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - shared with every rank, then raised as a named error
            self.raise_if_any_failed(exc, phase)
            raise
        self.raise_if_any_failed(None, phase)

    def arrive(self, phase: str, timeout_s: float) -> None:
        """Collective: wait for every rank before `phase`, at most `timeout_s`; a rank that does not arrive
        is named (torch's monitored_barrier reports which ranks failed to respond) instead of a silent hang.
        monitored_barrier needs gloo: with another backend (nccl) a gloo group of the same ranks is used."""
        if not is_distributed():
            return
        from datetime import timedelta

        group = self.group
        if dist.get_backend(group) != "gloo":
            if self._monitor_group is None:
                ranks = None if group is None else dist.get_process_group_ranks(group)
                self._monitor_group = dist.new_group(ranks=ranks, backend="gloo")
            group = self._monitor_group
        try:
            dist.monitored_barrier(group=group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            late = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", first)
            who = f"rank(s) [{', '.join(late.group(1).replace(',', ' ').split())}]" if late else "not every rank"
            raise StragglerError(f"{phase}: {who} did not arrive within {timeout_s:g}s "
                                 f"(lowrank.switch.barrier_timeout_s): {first}") from exc

    def gather_objects(self, obj: object) -> list:
        """Every rank's `obj`, in rank order, on every rank (small records such as switch measurements)."""
        if not is_distributed():
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_true(self, flag: bool) -> bool:
        """Collective AND (used for 'was this step finite on every rank')."""
        if not is_distributed():
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())
