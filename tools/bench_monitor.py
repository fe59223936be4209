"""Monitor overhead, sharded vs gathered estimation, and estimate accuracy (issue 8 items 1-3), 2 gloo ranks.

(a) Overhead on the real GPT demo model (configs/gpt_shakespeare_zero2.yaml, also run as ZeRO-3 and FSDP2):
    median time of one training step vs one `LowRankController.estimate` of all 16 targets, the ratio
    estimate/step, and the amortized overhead estimate / (cadence · step) at the config's cadence. Steps
    and estimates alternate in the same process, so every repeat gives its own ratio (median, min-max).
    The estimates are also checked against exact SVDs of the gathered weights (accuracy on trained weights).
(b) Sharded vs gathered on FSDP2 and ZeRO-3, square layers of width 256 ... 2048 (4096 with --widths):
    the monitor on each rank's shards (Lanczos / power iteration, one all-reduce of m- or n-vectors per
    product) against gathering every weight (`full_tensor()` / `safe_get_full_fp32_param`) + exact SVD
    on the owner rank. Time and bytes each rank sends (ring model of dist_lowrank.telemetry.comm, counted:
    torch.distributed calls by CommCounter, FSDP2's functional all-gathers by a dispatch mode) and the
    srank error of every method vs the exact value; the bytes growth exponent vs width is fitted
    (O(m+n) -> 1, O(m*n) -> 2). Layers alternate between nn.Linear's init (flat spectrum top: the hard
    case for σ_max) and a rank-w/16 product plus noise (a decaying spectrum).

    python tools/bench_monitor.py [--repeats 3] [--widths 256,512,1024,2048] [--json out.json]
    python tools/bench_monitor.py --widths 256,512,1024,2048,4096 --skip-gpt    # the 4096 point
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
from bench_common import machine  # noqa: E402

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "gpt_shakespeare_zero2.yaml")
GPT_BACKENDS: dict[str, list[str]] = {"zero2": [], "zero3": ["run.backend=deepspeed", "run.zero_stage=3"],
                                      "fsdp2": ["run.backend=fsdp2"]}
WIDTH_BACKENDS = ("fsdp2", "zero3")
OVERHEAD_TARGET = 0.005
ERROR_TARGET = 0.01


# -- small helpers (used in the parent and in the ranks) ---------------------------------------------
def summary(values: list[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(stat: dict[str, float], scale: float = 1.0, digits: int = 3) -> str:
    """`median [min-max]` of a summary, multiplied by `scale`."""
    return (f"{stat['median'] * scale:.{digits}f} [{stat['min'] * scale:.{digits}f}-"
            f"{stat['max'] * scale:.{digits}f}]")


def growth_exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x): y ∝ x^slope."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")




def full_weight(param: Any) -> Any:
    """The whole fp32 weight (collective for FSDP2 DTensors and ZeRO-3 partitions): benchmark only."""
    if hasattr(param, "full_tensor"):
        return param.full_tensor().detach()
    if hasattr(param, "ds_tensor"):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).detach()
    return param.detach()


def funcol_byte_mode(counter: Any) -> Any:
    """A dispatch mode that records FSDP2's functional all-gathers (which bypass torch.distributed's Python
    functions, so CommCounter does not see them) into `counter`, with the same ring model:
    (p-1)/p · gathered output bytes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FuncolBytes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "all_gather_into_tensor" in str(func) and len(args) >= 2:
                local, p = args[0], int(args[1])
                counter.record("all_gather_into_tensor", (p - 1) / p * p * local.numel() * local.element_size())
            return func(*args, **(kwargs or {}))

    return FuncolBytes()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# -- (a) overhead on the GPT demo --------------------------------------------------------------------
def gpt_worker(rank: int, world: int, config: str, overrides: list[str], steps: int, estimates: int,
               repeats: int, warmup: int) -> dict[str, Any]:
    """Alternate blocks of `steps` training steps and `estimates` monitor estimates, `repeats` times."""
    import torch

    from dist_lowrank.controller import LowRankController
    from dist_lowrank.linalg import stable_rank
    from dist_lowrank.monitor import RankMonitor
    from dist_lowrank.train.config_file import load_train_config
    from dist_lowrank.train.engine import make_backend
    from dist_lowrank.train.tasks import build_task

    run, lowrank = load_train_config(config, overrides)
    torch.manual_seed(run.seed)
    task = build_task(run)
    backend = make_backend(run, task, lowrank)
    controller = LowRankController(backend, lowrank)
    batches = task.batches(rank, world)
    step_no = 0

    def train_step() -> None:
        nonlocal step_no
        loss = task.loss_fn(backend.model, next(batches))
        backend.backward(loss)
        backend.step()
        float(loss.detach())
        step_no += 1

    for _ in range(warmup):
        train_step()
    controller.estimate(step_no)  # warm-up (first LAPACK / allocation costs)
    replicated = all(v.replicated for v in backend.shard_views(controller.names))
    exact_monitor = RankMonitor("exact") if replicated else None
    reps = []
    for _ in range(repeats):
        _barrier()
        step_times = [_timed(train_step)[0] for _ in range(steps)]
        _barrier()
        est_times = [_timed(lambda: controller.estimate(step_no))[0] for _ in range(estimates)]
        rep = {"step_s": statistics.median(step_times), "estimate_s": statistics.median(est_times)}
        if exact_monitor is not None:  # replicated layers: the owner could run an exact SVD instead
            _barrier()
            rep["exact_monitor_s"] = statistics.median(
                [_timed(lambda: exact_monitor.estimate(backend.shard_views(controller.names)))[0]
                 for _ in range(estimates)])
        reps.append(rep)
    # Accuracy on the trained weights: the last estimate vs exact SVD of each gathered weight.
    estimate = controller.estimate(step_no)
    modules = dict(backend.unwrapped_model().named_modules())
    errors = {}
    for name in controller.names:
        exact = stable_rank(full_weight(modules[name].weight), "exact").value
        errors[name] = {"exact": exact, "estimate": estimate[name], "rel_error": abs(estimate[name] - exact) / exact}
    return {"rank": rank, "backend": run.backend if run.backend != "deepspeed" else f"zero{run.zero_stage}",
            "layers": len(controller.names), "cadence": controller.method.cadence, "method": lowrank.monitor.method,
            "monitor_steps": lowrank.monitor.steps, "monitor_bytes": controller.monitor.stats.bytes,
            "monitor_rtol": lowrank.monitor.rtol, "monitor_iterations": controller.monitor.stats.iterations,
            "monitor_collectives": controller.monitor.stats.collectives, "replicated": replicated,
            "batch_size": run.batch_size, "block_size": run.block_size, "repeats": reps, "errors": errors}


def gpt_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from dist_lowrank.config import MonitorConfig
    from dist_lowrank.multiproc import run_ranks

    rows = []
    for name in args.gpt_backends.split(","):
        if name not in GPT_BACKENDS:
            raise SystemExit(f"--gpt-backends: {name!r}; allowed: {', '.join(GPT_BACKENDS)}")
        ranks = run_ranks(gpt_worker, timeout=1800, args=(args.config, GPT_BACKENDS[name], args.steps,
                                                           args.estimates, args.repeats, args.warmup))
        first = ranks[0]
        # The slower rank sets the pace of a synchronous step: take the max over ranks per repeat.
        step = [max(r["repeats"][i]["step_s"] for r in ranks) for i in range(args.repeats)]
        est = [max(r["repeats"][i]["estimate_s"] for r in ranks) for i in range(args.repeats)]
        ratio = [e / s for e, s in zip(est, step)]
        amortized = [x / first["cadence"] for x in ratio]
        default_cadence = MonitorConfig().cadence_steps  # the target is at the plugin's default cadence
        amortized_default = [x / default_cadence for x in ratio]
        row = {"backend": name, "layers": first["layers"], "cadence": first["cadence"], "method": first["method"],
               "monitor_steps": first["monitor_steps"], "monitor_bytes": first["monitor_bytes"],
               "monitor_collectives": first["monitor_collectives"], "replicated": first["replicated"],
               "batch_size": first["batch_size"], "block_size": first["block_size"],
               "step_s": summary(step), "estimate_s": summary(est), "estimate_per_step": summary(ratio),
               "amortized_overhead": summary(amortized), "default_cadence": default_cadence,
               "amortized_overhead_default": summary(amortized_default), "monitor_rtol": first["monitor_rtol"],
               "monitor_iterations": first["monitor_iterations"],
               "worst_rel_error": max(e["rel_error"] for e in first["errors"].values()), "errors": first["errors"],
               "per_rank": ranks}
        if "exact_monitor_s" in first["repeats"][0]:
            exact = [max(r["repeats"][i]["exact_monitor_s"] for r in ranks) for i in range(args.repeats)]
            row["exact_monitor_s"] = summary(exact)
            row["exact_monitor_per_step"] = summary([e / s for e, s in zip(exact, step)])
        rows.append(row)
    return rows


def print_gpt(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    if not rows:
        return
    r0 = rows[0]
    print(f"\n(a) Monitor overhead on the GPT demo ({os.path.relpath(args.config, ROOT)}: {r0['layers']} target "
          f"layers, {r0['method']} {r0['monitor_steps']} steps, cadence {r0['cadence']}, batch {r0['batch_size']}"
          f"x{r0['block_size']} tokens/rank), 2 gloo ranks")
    print(f"    {args.repeats} repeats of ({args.steps} steps, {args.estimates} estimates); per repeat the median, max "
          f"over ranks; shown: median [min-max] over repeats")
    head_cfg, head_def = f"amortized % @{r0['cadence']}", f"amortized % @{r0['default_cadence']}"
    print(f"{'backend':7} {'step s':>21} {'estimate s':>21} {'estimate/step':>21} {head_cfg:>21} {head_def:>21} "
          f"{'target':>6}")
    for r in rows:
        ok = "met" if r["amortized_overhead_default"]["median"] <= OVERHEAD_TARGET else "MISSED"
        print(f"{r['backend']:7} {fmt(r['step_s']):>21} {fmt(r['estimate_s']):>21} "
              f"{fmt(r['estimate_per_step']):>21} {fmt(r['amortized_overhead'], 100, 2):>21} "
              f"{fmt(r['amortized_overhead_default'], 100, 2):>21} {ok:>6}")
    print(f"    amortized = estimate / (cadence x step) at the config's cadence ({r0['cadence']}) and at the plugin's "
          f"default ({r0['default_cadence']}); target <= {100 * OVERHEAD_TARGET:.1f}% at the default")
    for r in rows:
        extra = ""
        if "exact_monitor_s" in r:
            extra = (f"; same layers with RankMonitor('exact') (owner SVDs): {fmt(r['exact_monitor_s'])} s = "
                     f"{fmt(r['exact_monitor_per_step'])} steps")
        print(f"    {r['backend']}: {r['monitor_collectives']} all-reduces, {r['monitor_bytes']:,} B, "
              f"{r['monitor_iterations']} Krylov steps (rtol {r['monitor_rtol']:g}) per estimate, "
              f"worst srank error vs exact SVD {100 * r['worst_rel_error']:.4f}%{extra}")


# -- (b) sharded vs gathered -------------------------------------------------------------------------
def build_square(width: int, layers: int) -> Any:
    """`layers` square Linear layers: even ones keep nn.Linear's init, odd ones get rank-w/16 + noise."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(width)
    torch.manual_seed(width)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    with torch.no_grad():
        for i, layer in enumerate(model):
            if i % 2:
                k = max(4, width // 16)
                a = torch.randn(width, k, generator=gen)
                b = torch.randn(k, width, generator=gen)
                noise = torch.randn(width, width, generator=gen)
                layer.weight.copy_((a @ b / math.sqrt(k) + 0.3 * noise) / math.sqrt(width))
    return model


def width_backend(name: str, width: int, layers: int) -> Any:
    import torch

    def optimizer(params):
        return torch.optim.AdamW(params, lr=1e-3)

    if name == "fsdp2":
        from dist_lowrank.backends.fsdp2_backend import FSDP2Backend, shard_each_layer

        return FSDP2Backend(lambda: build_square(width, layers), shard_each_layer, optimizer)
    if name == "zero3":
        from dist_lowrank.backends.deepspeed_backend import DeepSpeedBackend

        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "steps_per_print": 10**9}
        return DeepSpeedBackend(build_square(width, layers), config, optimizer)
    raise ValueError(f"backend {name!r}; allowed: {', '.join(WIDTH_BACKENDS)}")


def gathered_exact(backend: Any, names: list[str], rank: int, world: int) -> list[float]:
    """The baseline: gather every weight (all ranks take part), exact SVD on the layer's owner (layers spread
    like the monitor's replicated path, gathers first so the owners' SVDs run at the same time), share."""
    import torch
    import torch.distributed as dist

    from dist_lowrank.linalg import stable_rank
    from dist_lowrank.monitor import spread_by_cost

    modules = dict(backend.unwrapped_model().named_modules())
    dims = [tuple(getattr(modules[n].weight, "ds_shape", modules[n].weight.shape)) for n in names]
    owners = spread_by_cost([m * n for m, n in dims], world)
    mine = {}
    for i, name in enumerate(names):
        full = full_weight(modules[name].weight)
        if owners[i] == rank:
            mine[i] = full
        del full
    table = torch.zeros(len(names), dtype=torch.float64)
    for i, full in mine.items():
        table[i] = stable_rank(full, "exact").value
    del mine
    dist.all_reduce(table)
    return table.tolist()


def width_worker(rank: int, world: int, backend_name: str, widths: list[int], layers: int,
                 methods: list[tuple[str, int]], repeats: int) -> list[dict[str, Any]]:
    """Per width: one untimed pass that counts bytes, then `repeats` timed passes of every method."""
    import gc

    import torch.distributed as dist

    from dist_lowrank.monitor import RankMonitor
    from dist_lowrank.telemetry.comm import CommCounter

    counter = CommCounter().install()  # before DeepSpeed builds its comm backend (it keeps the functions)
    rows = []
    for width in widths:
        backend = width_backend(backend_name, width, layers)
        names = [str(i) for i in range(layers)]
        sharded: dict[str, list[float]] = {f"{m}:{s}": [] for m, s in methods}
        sharded_bytes: dict[str, float] = {}
        payload: dict[str, int] = {}
        values: dict[str, list[float]] = {}
        gathered: list[float] = []
        gathered_bytes = 0.0
        exact: list[float] = []
        for rep in range(repeats + 1):  # rep 0: warm-up, counts the bytes
            for method, steps in methods:
                key = f"{method}:{steps}"
                monitor = RankMonitor(method, steps)
                _barrier()
                counter.reset()
                seconds, result = _timed(lambda: monitor.estimate(backend.shard_views(names)))
                if rep == 0:
                    sharded_bytes[key], payload[key] = counter.total(), monitor.stats.bytes
                    values[key] = [result[n].value for n in names]
                else:
                    sharded[key].append(seconds)
            _barrier()
            counter.reset()
            if rep == 0:
                with funcol_byte_mode(counter):
                    exact = gathered_exact(backend, names, rank, world)
                gathered_bytes = counter.total()
            else:
                gathered.append(_timed(lambda: gathered_exact(backend, names, rank, world))[0])
        rows.append({"backend": backend_name, "width": width, "layers": layers, "rank": rank, "exact": exact,
                     "values": values, "sharded_s": sharded, "sharded_bytes": sharded_bytes,
                     "monitor_payload_bytes": payload, "gathered_s": gathered, "gathered_bytes": gathered_bytes,
                     "gathered_bytes_analytic": (world - 1) / world * 4 * width * width * layers})
        if hasattr(backend, "engine"):
            backend.engine.destroy()
        del backend
        gc.collect()
        dist.barrier()
    counter.uninstall()
    return rows


def width_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from dist_lowrank.multiproc import run_ranks

    widths = [int(w) for w in args.widths.split(",")]
    methods = [(m.split(":")[0], int(m.split(":")[1])) for m in args.methods.split(",")]
    out = []
    for name in args.width_backends.split(","):
        if name not in WIDTH_BACKENDS:
            raise SystemExit(f"--width-backends: {name!r}; allowed: {', '.join(WIDTH_BACKENDS)}")
        ranks = run_ranks(width_worker, timeout=3600, args=(name, widths, args.layers, methods, args.repeats))
        for i, width in enumerate(widths):
            per_rank = [r[i] for r in ranks]
            first = per_rank[0]
            gathered = [max(r["gathered_s"][k] for r in per_rank) for k in range(args.repeats)]
            for key in first["sharded_s"]:
                sharded = [max(r["sharded_s"][key][k] for r in per_rank) for k in range(args.repeats)]
                errors = [abs(v - e) / e for v, e in zip(first["values"][key], first["exact"])]
                out.append({"backend": name, "width": width, "layers": args.layers, "method": key,
                            "sharded_s": summary(sharded), "gathered_s": summary(gathered),
                            "gathered_over_sharded_time": summary([g / s for g, s in zip(gathered, sharded)]),
                            "sharded_bytes": max(r["sharded_bytes"][key] for r in per_rank),
                            "monitor_payload_bytes": first["monitor_payload_bytes"][key],
                            "gathered_bytes": max(r["gathered_bytes"] for r in per_rank),
                            "gathered_bytes_analytic": first["gathered_bytes_analytic"],
                            "exact_srank": first["exact"], "estimate_srank": first["values"][key],
                            "rel_errors": errors, "worst_rel_error": max(errors)})
    return out


def fits(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Growth exponents vs width of bytes and time, per backend and method."""
    out = []
    for key in sorted({(r["backend"], r["method"]) for r in rows}):
        sel = sorted((r for r in rows if (r["backend"], r["method"]) == key), key=lambda r: r["width"])
        if len(sel) < 2:
            continue
        w = [r["width"] for r in sel]
        out.append({"backend": key[0], "method": key[1], "widths": w,
                    "sharded_bytes_exponent": growth_exponent(w, [r["sharded_bytes"] for r in sel]),
                    "gathered_bytes_exponent": growth_exponent(w, [r["gathered_bytes"] for r in sel]),
                    "sharded_time_exponent": growth_exponent(w, [r["sharded_s"]["median"] for r in sel]),
                    "gathered_time_exponent": growth_exponent(w, [r["gathered_s"]["median"] for r in sel])})
    return out


def print_widths(rows: list[dict[str, Any]], fitted: list[dict[str, Any]], args: argparse.Namespace) -> None:
    if not rows:
        return
    print(f"\n(b) Sharded estimate vs gather + exact SVD, {args.layers} square layers per width "
          f"(init + rank-w/16+noise), 2 gloo ranks")
    print(f"    times: median [min-max] over {args.repeats} repeats (max over ranks); B = bytes each rank sends "
          f"(ring model, counted)")
    if 4096 not in [r["width"] for r in rows]:
        print("    width 4096 not run by default (exact SVD of 4096x4096 takes tens of seconds per layer on this "
              "machine); add it with --widths ...,4096")
    print(f"{'backend':7} {'width':>5} {'method':>10} {'sharded s':>21} {'gathered s':>21} {'gath/shard t':>12} "
          f"{'sharded B':>10} {'gathered B':>11} {'B ratio':>7} {'err %':>7}")
    for r in rows:
        print(f"{r['backend']:7} {r['width']:>5} {r['method']:>10} {fmt(r['sharded_s'], 1, 4):>21} "
              f"{fmt(r['gathered_s'], 1, 4):>21} {r['gathered_over_sharded_time']['median']:>12.2f} "
              f"{r['sharded_bytes']:>10,.0f} {r['gathered_bytes']:>11,.0f} "
              f"{r['gathered_bytes'] / r['sharded_bytes']:>7.1f} {100 * r['worst_rel_error']:>7.4f}")
    print("    gathered B analytic = (p-1)/p * 4 * m * n per layer; counted equals analytic: "
          + ("yes" if all(abs(r["gathered_bytes"] - r["gathered_bytes_analytic"]) <= 64 for r in rows) else "NO"))
    print(f"    err % = worst srank error vs exact SVD over the layers (target < {100 * ERROR_TARGET:.0f}%)")
    if fitted:
        print("    growth exponent vs width (log-log least squares): bytes ~ width^k, time ~ width^k")
        print(f"{'backend':7} {'method':>10} {'k sharded B':>11} {'k gathered B':>12} {'k sharded t':>11} "
              f"{'k gathered t':>12}")
        for f in fitted:
            print(f"{f['backend']:7} {f['method']:>10} {f['sharded_bytes_exponent']:>11.3f} "
                  f"{f['gathered_bytes_exponent']:>12.3f} {f['sharded_time_exponent']:>11.3f} "
                  f"{f['gathered_time_exponent']:>12.3f}")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="(a) the GPT demo config")
    parser.add_argument("--gpt-backends", default="zero2,zero3,fsdp2", help="(a) comma list of zero2, zero3, fsdp2")
    parser.add_argument("--steps", type=int, default=10, help="(a) training steps timed per repeat")
    parser.add_argument("--estimates", type=int, default=5, help="(a) estimates timed per repeat")
    parser.add_argument("--warmup", type=int, default=3, help="(a) untimed training steps first")
    parser.add_argument("--widths", default="256,512,1024,2048", help="(b) comma list of square layer widths")
    parser.add_argument("--layers", type=int, default=2, help="(b) layers per width")
    parser.add_argument("--methods", default="lanczos:30,power:30", help="(b) monitor method:steps list")
    parser.add_argument("--width-backends", default="fsdp2,zero3", help="(b) comma list of fsdp2, zero3")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (both parts)")
    parser.add_argument("--skip-gpt", action="store_true", help="run only (b)")
    parser.add_argument("--skip-widths", action="store_true", help="run only (a)")
    parser.add_argument("--json", default=None, help="write every measurement here")
    args = parser.parse_args(argv)
    args.config = os.path.abspath(args.config)
    start = time.perf_counter()
    gpt = [] if args.skip_gpt else gpt_rows(args)
    print_gpt(gpt, args)
    widths = [] if args.skip_widths else width_rows(args)
    fitted = fits(widths)
    print_widths(widths, fitted, args)
    wall = time.perf_counter() - start
    print(f"\nwall {wall:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "settings": vars(args), "wall_s": wall, "gpt": gpt, "widths": widths,
                       "fits": fitted}, fh, indent=2)


if __name__ == "__main__":
    main()
