"""Measure the monitor and the switch on 2 real gloo ranks, per backend, in one run.

For each backend (DDP, FSDP2, DeepSpeed ZeRO-1/2/3) on a stack of square Linear layers:
- stable-rank estimate error vs exact SVD of the gathered weight (worst layer),
- bytes the monitor all-reduces per estimate vs the bytes a full gather of the weights would move,
- estimate time, switch time, and peak RSS per rank before/after the switch.

    python tools/bench_switch.py [--width 512] [--layers 6] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BACKENDS = ["ddp", "fsdp2", "zero1", "zero2", "zero3"]


def build(width: int, layers: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(nn.Linear(32, width), nn.GELU(), *blocks, nn.Linear(width, 8))


def worker(rank: int, world: int, backend_name: str, width: int, layers: int) -> dict:
    import torch
    import torch.nn.functional as F

    from dist_lowrank.reshape.pipeline import peak_rss_mb
    from dist_lowrank.linalg import stable_rank
    from dist_lowrank.monitor import RankMonitor
    from dist_lowrank.plan import Plan
    from dist_lowrank.reshape.builders import switch_change

    def optimizer(params):
        return torch.optim.AdamW(params, lr=1e-3)

    if backend_name == "ddp":
        from dist_lowrank.backends.ddp_backend import DDPBackend

        backend = DDPBackend(build(width, layers), optimizer)
    elif backend_name == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        from dist_lowrank.backends.fsdp2_backend import FSDP2Backend

        def shard(model):
            for module in model:
                if isinstance(module, torch.nn.Linear):
                    fully_shard(module)
            return fully_shard(model)

        backend = FSDP2Backend(lambda: build(width, layers), shard, optimizer)
    else:
        from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend

        stage = int(backend_name[-1])
        config = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                  "steps_per_print": 10**9}
        backend = DeepSpeedBackend(build(width, layers), config, optimizer)
    names = [str(2 * i + 2) for i in range(layers)]
    gen = torch.Generator().manual_seed(rank)

    def train_step():
        x = torch.randn(16, 32, generator=gen)
        loss = F.mse_loss(backend.model(x), torch.zeros(16, 8))
        backend.backward(loss)
        backend.step()

    for _ in range(3):
        train_step()
    steady_rss = peak_rss_mb()
    step_start = time.perf_counter()
    for _ in range(3):
        train_step()
    step_seconds = (time.perf_counter() - step_start) / 3
    monitor = RankMonitor("lanczos", 20)
    start = time.perf_counter()
    estimates = monitor.estimate(backend.shard_views(names))
    estimate_seconds = time.perf_counter() - start
    # Exact reference: gather each layer once (benchmark only; the product never does this).
    exact = {}
    for name in names:
        module = dict(backend.unwrapped_model().named_modules())[name]
        weight = module.weight
        if hasattr(weight, "full_tensor"):
            full = weight.full_tensor()
        elif hasattr(weight, "ds_tensor"):
            from deepspeed.utils import safe_get_full_fp32_param

            full = safe_get_full_fp32_param(weight)
        else:
            full = weight.detach()
        exact[name] = stable_rank(full, "exact").value
    worst = max(abs(estimates[n].value - exact[n]) / exact[n] for n in names)
    plan = Plan("switch", 6, {n: width // 8 for n in names})
    measurements = backend.apply(switch_change(backend.unwrapped_model(), plan.ranks, plan.step))
    train_step()
    return {"backend": backend_name, "rank": rank, "worst_rel_error": worst, "monitor_bytes": monitor.stats.bytes,
            "monitor_collectives": monitor.stats.collectives, "gather_bytes": 4 * width * width * layers,
            "estimate_seconds": estimate_seconds, "step_seconds": step_seconds,
            "switch_seconds": measurements["seconds"], "steady_peak_rss_mb": steady_rss,
            "switch_peak_rss_mb": measurements["peak_rss_mb"]}


def main() -> None:
    from dist_lowrank.multiproc import run_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for name in args.backends.split(","):
        rows += run_ranks(worker, args=(name, args.width, args.layers), timeout=600)
    header = (f"{'backend':8} {'rank':>4} {'srank err':>9} {'monitor B':>10} {'gather B':>10} {'ratio':>6} "
              f"{'est s':>6} {'step s':>6} {'switch s':>8} {'RSS MB':>7} {'switch RSS':>10}")
    print(f"{args.layers} layers of {args.width}x{args.width}, 2 gloo ranks, Lanczos 20 steps")
    print(header)
    for r in rows:
        print(f"{r['backend']:8} {r['rank']:>4} {100 * r['worst_rel_error']:>8.3f}% {r['monitor_bytes']:>10,} "
              f"{r['gather_bytes']:>10,} {r['gather_bytes'] / max(1, r['monitor_bytes']):>6.1f} "
              f"{r['estimate_seconds']:>6.3f} {r['step_seconds']:>6.3f} {r['switch_seconds']:>8.3f} "
              f"{r['steady_peak_rss_mb']:>7.0f} {r['switch_peak_rss_mb']:>10.0f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
