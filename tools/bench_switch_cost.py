"""Switch cost per backend on 2 gloo ranks (issue 8 item 6): latency in training steps and peak memory.

Compared, in the same process and repeat: the median training step before the switch (the time unit) and one
`backend.apply(switch_change(...))` that factorizes every hidden layer of a stack of square Linear layers
(tools/bench_switch.py's `build`, width 512, rank width/8) for 2, 4, 8, 16 layers on DDP, FSDP2, ZeRO-2, ZeRO-3;
and the peak RSS during the steady training steps vs during the switch (sampled every 2 ms by
dist_lowrank.backends.ds_memory.RssPeak). Latency = switch seconds / step seconds; "incl.1st" also charges the
first step after the switch its extra time over a later step (engines warm up lazily). Memory ratio = peak RSS
during the switch / peak RSS during steady steps (target <= 1.3). The RSS of a process with torch + DeepSpeed
loaded is mostly libraries, so the model's own part (steady peak - RSS before the engine was built) and the
switch's transient (switch peak - RSS when it started) are shown too: with no whole-model gather the transient
stays flat as layers are added while the model part grows.
The same is measured on the GPT demo model (configs/gpt_shakespeare_zero2.yaml, built as `dist-lowrank train`
builds it; ZeRO-2 as in the config by default, any of ddp/fsdp2/zero2/zero3 with --gpt-backends), all 16 targets
switched to rank min(m, n) // 4: the latency in units of the demo's own training step.
Workers run with MALLOC_MMAP_THRESHOLD_=131072 so freed large tensors leave the RSS (repeats start clean); one
short unreported repeat first absorbs one-time library initialization.

    python tools/bench_switch_cost.py [--layers 2,4,8,16] [--width 512] [--batch 64] [--repeats 3] [--json out.json]
    python tools/bench_switch_cost.py --backends '' --gpt-backends ddp,fsdp2,zero2,zero3    # GPT demo only
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
from bench_common import machine  # noqa: E402

BACKENDS = ("ddp", "fsdp2", "zero2", "zero3")
LATENCY_TARGET = 10.0
MEMORY_TARGET = 1.3
MMAP_THRESHOLD = "131072"
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "gpt_shakespeare_zero2.yaml")
GPT_BACKENDS: dict[str, list[str]] = {"ddp": ["run.backend=ddp"], "fsdp2": ["run.backend=fsdp2"], "zero2": [],
                                      "zero3": ["run.backend=deepspeed", "run.zero_stage=3"]}


def summary(values: list[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(stat: dict[str, float], digits: int = 2) -> str:
    return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}-{stat['max']:.{digits}f}]"




def make_backend(name: str, width: int, layers: int, batch: int) -> Any:
    """The stack of tools/bench_switch.py on one of the four engines."""
    import torch

    from bench_switch import build

    def optimizer(params):
        return torch.optim.AdamW(params, lr=1e-3)

    if name == "ddp":
        from dist_lowrank.backends.ddp_backend import DDPBackend

        return DDPBackend(build(width, layers), optimizer)
    if name == "fsdp2":
        from dist_lowrank.backends.fsdp2_backend import FSDP2Backend, shard_each_layer

        return FSDP2Backend(lambda: build(width, layers), shard_each_layer, optimizer)
    if name in ("zero2", "zero3"):
        from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend

        config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": int(name[-1]), "stage3_param_persistence_threshold": 0},
                  "steps_per_print": 10**9}
        return DeepSpeedBackend(build(width, layers), config, optimizer)
    raise ValueError(f"backend {name!r}; allowed: {', '.join(BACKENDS)}")


def release(backend: Any) -> None:
    """Drop an engine between repeats (DeepSpeed: the same teardown the backend does before a rebuild)."""
    if hasattr(backend, "_release_engine"):
        backend._release_engine()
    gc.collect()


def measure(backend: Any, train_step: Callable[[], float], plan: Any, steps: int, warmup: int) -> dict[str, Any]:
    """Warm-up, `steps` timed steady steps (RSS sampled), the switch (RSS sampled), the first and `steps` more
    timed steps. Every rank calls it (collective)."""
    import torch.distributed as dist

    from dist_lowrank.backends.ds_memory import RssPeak

    for _ in range(warmup):
        train_step()
    dist.barrier()
    with RssPeak() as steady:
        before = [train_step() for _ in range(steps)]
    from dist_lowrank.reshape.builders import switch_change

    dist.barrier()
    with RssPeak() as during:
        start = time.perf_counter()
        measurements = backend.apply(switch_change(backend.unwrapped_model(), plan.ranks, plan.step))
        switch_s = time.perf_counter() - start
    first_after = train_step()
    after = [train_step() for _ in range(steps)]
    step_s, step_after_s = statistics.median(before), statistics.median(after)
    return {"step_s": step_s, "step_after_s": step_after_s, "first_step_after_s": first_after,
            "switch_s": switch_s, "latency_steps": switch_s / step_s,
            "latency_incl_first_steps": (switch_s + max(0.0, first_after - step_after_s)) / step_s,
            "steady_peak_rss_mb": steady.peak_mb, "switch_start_rss_mb": during.start_mb,
            "switch_peak_rss_mb": during.peak_mb, "switch_extra_mb": during.peak_mb - steady.peak_mb,
            "memory_ratio": during.peak_mb / steady.peak_mb,
            "measurements": {k: v for k, v in measurements.items() if isinstance(v, (int, float))}}


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _finish(row: dict[str, Any], base: float) -> dict[str, Any]:
    row["base_rss_mb"] = base
    row["model_memory_ratio"] = (row["switch_peak_rss_mb"] - base) / max(1e-9, row["steady_peak_rss_mb"] - base)
    return row


def worker(rank: int, world: int, backend_name: str, width: int, layer_counts: list[int], batch: int, steps: int,
           repeats: int, warmup: int, gc_freeze: bool) -> list[dict[str, Any]]:
    """Per layer count (ascending) and repeat: fresh engine, warm-up, timed steady steps, switch, timed steps."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from dist_lowrank.plan import Plan

    if backend_name.startswith("zero"):  # imports and DeepSpeed's comm setup before the baseline RSS
        from dist_lowrank.backends.ds_runtime import init_deepspeed_distributed

        init_deepspeed_distributed()
    if gc_freeze:  # as `dist-lowrank train` does before it builds a model (dist_lowrank/gc_freeze.py)
        from dist_lowrank.gc_freeze import freeze_startup_objects

        freeze_startup_objects("deepspeed" if backend_name.startswith("zero") else backend_name)
    elif backend_name == "fsdp2":
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    rows = []
    for layers in layer_counts:
        names = [str(2 * i + 2) for i in range(layers)]  # the hidden square layers of build()
        # repeat -1 (first configuration only, short, not reported): one-time library initialization
        for rep in range(-1 if layers == layer_counts[0] else 0, repeats):
            gc.collect()
            base = _rss_mb()
            backend = make_backend(backend_name, width, layers, batch)
            gen = torch.Generator().manual_seed(1000 * rep + rank)

            def train_step() -> float:
                start = time.perf_counter()
                x = torch.randn(batch, 32, generator=gen)
                loss = F.mse_loss(backend.model(x), torch.zeros(batch, 8))
                backend.backward(loss)
                backend.step()
                float(loss.detach())
                return time.perf_counter() - start

            plan = Plan("switch", warmup + steps, {n: width // 8 for n in names})
            row = measure(backend, train_step, plan, steps if rep >= 0 else 1, warmup if rep >= 0 else 1)
            row.update({"backend": backend_name, "rank": rank, "layers": layers, "width": width, "repeat": rep})
            if rep >= 0:
                rows.append(_finish(row, base))
            release(backend)
            del backend
            gc.collect()
            dist.barrier()
    return rows


def gpt_worker(rank: int, world: int, name: str, config: str, overrides: list[str], steps: int, repeats: int,
               warmup: int, rank_divisor: int, gc_freeze: bool) -> list[dict[str, Any]]:
    """The GPT demo model (built like `dist-lowrank train` does), every target switched to min(m, n) // divisor."""
    import torch
    import torch.distributed as dist

    from dist_lowrank.plan import Plan
    from dist_lowrank.targeting import select_targets
    from dist_lowrank.train.config_file import load_train_config
    from dist_lowrank.train.engine import make_backend as make_train_backend
    from dist_lowrank.train.tasks import build_task

    run, lowrank = load_train_config(config, overrides)
    if run.backend == "deepspeed":
        from dist_lowrank.backends.ds_runtime import init_deepspeed_distributed

        init_deepspeed_distributed()
    if gc_freeze:
        from dist_lowrank.gc_freeze import freeze_startup_objects

        freeze_startup_objects(run.backend)
    task = build_task(run)  # data once: its temporaries are freed before the first baseline
    rows = []
    for rep in range(-1, repeats):  # repeat -1 (short, not reported): one-time library initialization
        torch.manual_seed(run.seed)
        gc.collect()
        base = _rss_mb()
        backend = make_train_backend(run, task, lowrank)
        targets = list(select_targets(backend.unwrapped_model(), lowrank.target_modules, lowrank.exclude_modules))
        dims = {v.name: v.dims for v in backend.shard_views(targets)}
        batches = task.batches(rank, world)

        def train_step() -> float:
            start = time.perf_counter()
            loss = task.loss_fn(backend.model, next(batches))
            backend.backward(loss)
            backend.step()
            float(loss.detach())
            return time.perf_counter() - start

        plan = Plan("switch", warmup + steps, {n: max(1, min(dims[n]) // rank_divisor) for n in targets})
        row = measure(backend, train_step, plan, steps if rep >= 0 else 1, warmup if rep >= 0 else 1)
        row.update({"backend": name, "rank": rank, "layers": len(targets), "width": run.n_embd, "repeat": rep,
                    "tokens": f"{run.batch_size}x{run.block_size}"})
        if rep >= 0:
            rows.append(_finish(row, base))
        release(backend)
        del backend
        gc.collect()
        dist.barrier()
    return rows


def aggregate(ranks: list[list[dict[str, Any]]], layer_counts: list[int], repeats: int) -> list[dict[str, Any]]:
    """Per layer count: per repeat the slower rank's time and the larger rank's memory, then over repeats."""
    out = []
    for layers in layer_counts:
        per_rep = []
        for rep in range(repeats):
            rows = [r for rank in ranks for r in rank if r["layers"] == layers and r["repeat"] == rep]
            step = max(r["step_s"] for r in rows)
            switch = max(r["switch_s"] for r in rows)
            extra_first = max(max(0.0, r["first_step_after_s"] - r["step_after_s"]) for r in rows)
            per_rep.append({"step_s": step, "switch_s": switch, "latency_steps": switch / step,
                            "latency_incl_first_steps": (switch + extra_first) / step,
                            "step_after_s": max(r["step_after_s"] for r in rows),
                            "steady_peak_rss_mb": max(r["steady_peak_rss_mb"] for r in rows),
                            "switch_peak_rss_mb": max(r["switch_peak_rss_mb"] for r in rows),
                            "switch_extra_mb": max(r["switch_extra_mb"] for r in rows),
                            "switch_transient_mb": max(r["switch_peak_rss_mb"] - r["switch_start_rss_mb"]
                                                       for r in rows),
                            "memory_ratio": max(r["memory_ratio"] for r in rows),
                            "model_memory_ratio": max(r["model_memory_ratio"] for r in rows),
                            "model_mb": max(r["steady_peak_rss_mb"] - r["base_rss_mb"] for r in rows)})
        row = {"layers": layers, "backend": ranks[0][0]["backend"], "width": ranks[0][0]["width"]}
        for key in per_rep[0]:
            row[key] = summary([p[key] for p in per_rep])
        row["per_rank"] = [r for rank in ranks for r in rank if r["layers"] == layers]
        out.append(row)
    return out


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(title)
    print(f"{'backend':9} {'layers':>6} {'step s':>19} {'switch s':>19} {'latency steps':>17} {'incl.1st':>8} "
          f"{'steady MB':>9} {'switch MB':>9} {'mem ratio':>9} {'model MB':>8} {'transient MB':>12} "
          f"{'model ratio':>11}")
    for r in rows:
        print(f"{r['backend']:9} {r['layers']:>6} {fmt(r['step_s'], 4):>19} {fmt(r['switch_s'], 3):>19} "
              f"{fmt(r['latency_steps'], 1):>17} {r['latency_incl_first_steps']['median']:>8.1f} "
              f"{r['steady_peak_rss_mb']['median']:>9.0f} {r['switch_peak_rss_mb']['median']:>9.0f} "
              f"{r['memory_ratio']['median']:>9.3f} {r['model_mb']['median']:>8.1f} "
              f"{r['switch_transient_mb']['median']:>12.1f} {r['model_memory_ratio']['median']:>11.2f}")
    print(f"    targets: latency <= {LATENCY_TARGET:.0f} steps, mem ratio (peak RSS switch / steady) <= "
          f"{MEMORY_TARGET}; incl.1st = latency + the first\n    post-switch step's extra time; model MB = steady "
          f"peak - RSS before the model was built; transient MB = switch peak -\n    RSS when the switch started; "
          f"model ratio = (switch peak - RSS before the model) / model MB")
    for name in dict.fromkeys(r["backend"] for r in rows):
        sel = [r for r in rows if r["backend"] == name]
        lat = max(r["latency_steps"]["median"] for r in sel)
        mem = max(r["memory_ratio"]["median"] for r in sel)
        transient = " / ".join(f"{r['switch_transient_mb']['median']:.1f}" for r in sel)
        model = " / ".join(f"{r['model_mb']['median']:.1f}" for r in sel)
        print(f"    {name}: worst latency {lat:.1f} steps ({'met' if lat <= LATENCY_TARGET else 'MISSED'}), "
              f"worst mem ratio {mem:.3f} ({'met' if mem <= MEMORY_TARGET else 'MISSED'}); transient MB {transient} "
              f"vs model MB {model}")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma list of ddp, fsdp2, zero2, zero3")
    parser.add_argument("--layers", default="2,4,8,16", help="comma list of hidden layer counts")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64, help="samples per rank per training step")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps before and after the switch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--repeats", type=int, default=3, help="fresh engines per configuration")
    parser.add_argument("--gpt-backends", default="zero2",
                        help="the GPT demo model on these backends too: ddp, fsdp2, zero2, zero3 ('' = skip)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the GPT demo config")
    parser.add_argument("--gpt-rank-divisor", type=int, default=4, help="GPT targets switch to min(m, n) // this")
    parser.add_argument("--no-gc-freeze", action="store_true",
                        help="skip gc.freeze() before the models are built (dist-lowrank train does it)")
    parser.add_argument("--json", default=None, help="write every measurement here")
    args = parser.parse_args(argv)
    from dist_lowrank.multiproc import run_ranks

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)  # inherited by the spawned ranks
    layer_counts = sorted(int(x) for x in args.layers.split(",") if x)
    start = time.perf_counter()
    rows = []
    for name in [b for b in args.backends.split(",") if b]:
        if name not in BACKENDS:
            raise SystemExit(f"--backends: {name!r}; allowed: {', '.join(BACKENDS)}")
        ranks = run_ranks(worker, timeout=3600, args=(name, args.width, layer_counts, args.batch, args.steps,
                                                      args.repeats, args.warmup, not args.no_gc_freeze))
        rows += aggregate(ranks, layer_counts, args.repeats)
    gpt = []
    for name in [b for b in args.gpt_backends.split(",") if b]:
        if name not in GPT_BACKENDS:
            raise SystemExit(f"--gpt-backends: {name!r}; allowed: {', '.join(GPT_BACKENDS)}")
        ranks = run_ranks(gpt_worker, timeout=3600, args=(f"gpt-{name}", os.path.abspath(args.config),
                                                          GPT_BACKENDS[name], args.steps, args.repeats, args.warmup,
                                                          args.gpt_rank_divisor, not args.no_gc_freeze))
        gpt += aggregate(ranks, [ranks[0][0]["layers"]], args.repeats)
    if rows:
        print_table(f"(1) Linear stack: switch of every hidden layer (width {args.width}, rank {args.width // 8}), "
                    f"batch {args.batch}, 2 gloo ranks, gc.freeze() {'off' if args.no_gc_freeze else 'on'};\n    median [min-max] over {args.repeats} repeats "
                    f"(per repeat: slower rank's time, larger rank's memory)", rows)
    if gpt:
        tokens, config = gpt[0]["per_rank"][0]["tokens"], os.path.relpath(os.path.abspath(args.config), ROOT)
        print_table(f"\n(2) GPT demo ({config}, batch {tokens} tokens/rank): all {gpt[0]['layers']} targets of "
                    f"lowrank.target_modules switched\n    to rank min(m, n) // {args.gpt_rank_divisor}; median "
                    f"[min-max] over {args.repeats} repeats", gpt)
    wall = time.perf_counter() - start
    print(f"\nwall {wall:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "settings": vars(args), "wall_s": wall, "rows": rows, "gpt": gpt}, fh,
                      indent=2)


if __name__ == "__main__":
    main()
