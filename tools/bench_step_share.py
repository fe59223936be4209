"""What share of a training step the factorizable (targeted) layers take, and so what factorizing can buy.

One process, torch/OMP threads = 1 like each rank of `dist-lowrank train`. The model, batch, loss and optimizer
are the training job's (train/tasks.py's model for the config's widths, the loop's AdamW recipe, gradient
clipping when the config sets it). Measured, median over --iters after --warmup:
  - the step: zero_grad + forward + backward (+ clip) + AdamW step (+ lr schedule), dense and with every
    targeted layer factorized at each --rank-ratio r (rank = round(r·min(m, n))), interleaved round by round;
  - each targeted nn.Linear alone on its recorded input shape (a forward pre-hook during one training
    forward): forward + backward with the input gradient, as in the model, dense and factorized.
share = Σ dense layer time / dense step time. Amdahl: with layers s = Σdense/Σfactorized faster, the step can
be at most 1 / ((1 - share) + share / s) faster (1 / (1 - share) if the layers took no time); the measured
step speed-up is printed beside it (it also gains from AdamW over fewer parameters). With --compile every
model is also timed under torch.compile (a copy each; its first step, which compiles, timed apart), so the
factorized speed-up is measured against a compiled dense step too. The engine
(DeepSpeed's buckets, the gradient all-reduce) is not in this one-process step.

    python tools/bench_step_share.py [--config configs/gpt_shakespeare_zero2.yaml] [--rank-ratio 0.25,0.5] \\
        [--override run.n_embd=384 --override run.n_head=6 --override run.n_layer=6] [--compile] [--json share.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ROOT, input_shapes, machine, task_and_model  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402


# -- pure arithmetic (tested by hand) ----------------------------------------------------------------------
def amdahl_bound(share: float, layer_speedup: float = float("inf")) -> float:
    """The step speed-up when a `share` of the step runs `layer_speedup` times faster and the rest not at all."""
    if not 0 <= share <= 1 or layer_speedup <= 0:
        raise ValueError(f"share {share} must be in [0, 1] and layer_speedup {layer_speedup} > 0")
    rest = 1.0 - share + (share / layer_speedup if layer_speedup != float("inf") else 0.0)
    return 1.0 / rest if rest > 0 else float("inf")


def rank_at(ratio: float, m: int, n: int) -> int:
    """The factor rank at `ratio` of min(m, n), at least 1."""
    return max(1, min(min(m, n), round(ratio * min(m, n))))


# -- timing ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def make_stepper(model: nn.Module, loss_fn: Callable, batch: Any, run: Any, device: torch.device
                 ) -> Callable[[], dict[str, float]]:
    """A closure that runs one training step and returns its (forward, backward, optimizer) seconds."""
    optimizer, scheduler = _optimizer(model, run)
    clip = float(getattr(run, "grad_clip", 0.0) or 0.0)

    def step() -> dict[str, float]:
        _sync(device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        _sync(device)
        t3 = time.perf_counter()
        return {"step_s": t3 - t0, "forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2}
    return step


def _optimizer(model: nn.Module, run: Any) -> tuple[torch.optim.Optimizer, Any]:
    """The training loop's AdamW (param groups, betas) and lr schedule when it has them, else plain AdamW."""
    try:
        from dist_lowrank.train.recipe import optimizer_factory, scheduler_factory
    except ImportError:
        return torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay), None
    optimizer = optimizer_factory(run)(model.parameters())
    make_scheduler = scheduler_factory(run)
    return optimizer, make_scheduler(optimizer) if make_scheduler else None


def time_steps(steppers: dict[str, Callable[[], dict[str, float]]], iters: int, warmup: int
               ) -> dict[str, dict[str, float]]:
    """Median (forward, backward, optimizer, whole) step seconds per model, the models taking turns each round
    so a change of machine load hits all of them."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in steppers}
    for i in range(warmup + iters):
        for name, step in steppers.items():
            times = step()
            if i >= warmup:
                samples[name].append(times)
    return {name: {key: _median([s[key] for s in rows]) for key in rows[0]} for name, rows in samples.items()}


def time_layer(module: nn.Module, shape: tuple[int, ...], iters: int, warmup: int, device: torch.device) -> float:
    """Median seconds of forward + backward of `module` alone on a random input of `shape`; the input needs its
    gradient, as every targeted layer's input does inside the model."""
    dtype = getattr(shape, "dtype", torch.float32)
    x = torch.randn(*shape, device=device, dtype=dtype if dtype.is_floating_point else torch.float32,
                    requires_grad=True)
    grad = torch.randn(*shape[:-1], _out_features(module), device=device, dtype=x.dtype)
    samples = []
    for i in range(warmup + iters):
        module.zero_grad(set_to_none=True)
        x.grad = None
        _sync(device)
        start = time.perf_counter()
        module(x).backward(grad)
        _sync(device)
        if i >= warmup:
            samples.append(time.perf_counter() - start)
    return _median(samples)


def _out_features(module: nn.Module) -> int:
    return int(getattr(module, "out_features"))


# -- the measurement ---------------------------------------------------------------------------------------
def measure(config: Path, overrides: list[str], ratios: list[float], iters: int, warmup: int,
            device: Optional[torch.device] = None, compile_models: bool = False) -> dict[str, Any]:
    """The step and layer times, shares and speed-ups (see the module docstring) as one dict."""
    from dist_lowrank.device import default_device
    from dist_lowrank.layers import LowRankLinear
    from dist_lowrank.layers.shapes import matrix_dims
    from dist_lowrank.surgery import apply_rank_plan, count_parameters
    from dist_lowrank.targeting import candidate_layers, select_targets

    device = device or default_device()
    run, lowrank, task, model = task_and_model(config, overrides, device)
    targets = select_targets(model, lowrank.target_modules, lowrank.exclude_modules)
    linears = {n: m for n, m in candidate_layers(model).items() if isinstance(m, nn.Linear)}
    skipped = sorted(set(targets) - set(linears))  # conv / Conv1D targets: this tool times nn.Linear only
    targets = {n: m for n, m in targets.items() if n in linears}
    if not targets:
        raise SystemExit("bench_step_share: lowrank.target_modules matches no nn.Linear of this model")
    batch = next(task.batches(0, run.world_size))
    shapes = input_shapes(run, task, model, list(linears))

    models = {"dense": model}
    ranks_at: dict[float, dict[str, int]] = {}
    for ratio in ratios:
        ranks_at[ratio] = {n: rank_at(ratio, *matrix_dims(m)) for n, m in targets.items()}
        factorized = copy.deepcopy(model)
        apply_rank_plan(factorized, ranks_at[ratio])
        models[f"r={ratio:g}"] = factorized
    compiled_s: dict[str, float] = {}
    if compile_models:  # both sides compiled alike: a copy of each model, so eager and compiled train apart
        for name in list(models):
            compiled = torch.compile(copy.deepcopy(models[name]))
            start = time.perf_counter()
            make_stepper(compiled, task.loss_fn, batch, run, device)()  # compiles forward and backward
            compiled_s[name] = time.perf_counter() - start
            models[f"{name}+compile"] = compiled
    steppers = {name: make_stepper(m, task.loss_fn, batch, run, device) for name, m in models.items()}
    steps = time_steps(steppers, iters, warmup)

    layers: dict[str, dict[str, Any]] = {}
    for name, module in linears.items():
        if name not in shapes:
            continue
        m, n = matrix_dims(module)
        row: dict[str, Any] = {"shape": [m, n], "input": list(shapes[name]), "targeted": name in targets,
                               "dense_s": time_layer(copy.deepcopy(module), shapes[name], iters, warmup, device)}
        if name in targets:
            for ratio in ratios:
                rank = ranks_at[ratio][name]
                fact = LowRankLinear(n, m, rank, bias=module.bias is not None).to(device)
                row[f"r={ratio:g}"] = {"rank": rank, "factorized_s": time_layer(fact, shapes[name], iters, warmup,
                                                                                 device)}
        layers[name] = row

    dense_step = steps["dense"]["step_s"]
    dense_sum = sum(r["dense_s"] for r in layers.values() if r["targeted"])
    other_sum = sum(r["dense_s"] for r in layers.values() if not r["targeted"])
    share = min(1.0, dense_sum / dense_step)
    by_ratio = {}
    for ratio in ratios:
        key = f"r={ratio:g}"
        fact_sum = sum(r[key]["factorized_s"] for r in layers.values() if r["targeted"])
        layer_speedup = dense_sum / fact_sum
        by_ratio[key] = {"ratio": ratio, "layers_factorized_s": fact_sum, "layer_speedup": layer_speedup,
                         "amdahl_step_speedup": amdahl_bound(share, layer_speedup),
                         "measured_step_speedup": dense_step / steps[key]["step_s"],
                         "step": steps[key], "params": count_parameters(models[key])}
    compiled = {name: {"compile_s": seconds, "step": steps[f"{name}+compile"],
                       "speedup_vs_eager_dense": dense_step / steps[f"{name}+compile"]["step_s"],
                       "speedup_vs_compiled_dense": steps["dense+compile"]["step_s"] / steps[f"{name}+compile"]["step_s"]}
                for name, seconds in compiled_s.items()}
    return {"machine": machine(), "device": str(device), "threads": torch.get_num_threads(),
            "settings": {"config": str(config), "overrides": overrides, "iters": iters, "warmup": warmup,
                         "ratios": ratios, "n_layer": run.n_layer, "n_embd": run.n_embd, "batch_size": run.batch_size,
                         "block_size": run.block_size},
            "step": steps["dense"], "params": count_parameters(model), "targeted": sorted(targets),
            "skipped_targets": skipped, "layers": layers, "targeted_dense_s": dense_sum, "other_linear_s": other_sum,
            "share": share, "other_linear_share": other_sum / dense_step,
            "amdahl_bound_free_layers": amdahl_bound(share), "ratios": by_ratio, "compiled": compiled}


def report(data: dict[str, Any]) -> list[str]:
    """The printed summary."""
    s, step = data["settings"], data["step"]
    ms = lambda v: f"{1e3 * v:.2f} ms"  # noqa: E731
    lines = [f"config {s['config']}, overrides: {' '.join(s['overrides']) or '(none)'}",
             f"model {s['n_layer']} layers x {s['n_embd']}, batch {s['batch_size']} x {s['block_size']} tokens, "
             f"{data['params']:,} params; {data['device']}, {data['threads']} thread(s); median of {s['iters']}",
             f"dense step {ms(step['step_s'])}: forward {ms(step['forward_s'])}, backward {ms(step['backward_s'])}, "
             f"optimizer {ms(step['optimizer_s'])}",
             f"targeted layers ({len(data['targeted'])}), fwd+bwd alone: {ms(data['targeted_dense_s'])} = "
             f"{100 * data['share']:.1f}% of the step; other Linear (e.g. lm_head): {ms(data['other_linear_s'])} = "
             f"{100 * data['other_linear_share']:.1f}%",
             f"Amdahl bound if the targeted layers took no time: {data['amdahl_bound_free_layers']:.2f}x"]
    if data["skipped_targets"]:
        lines.append(f"not timed (not nn.Linear): {', '.join(data['skipped_targets'])}")
    lines += ["", "| rank ratio | layers dense → factorized | layer speed-up | Amdahl step bound | measured step "
              "speed-up | factorized step | params |", "|---|---|---|---|---|---|---|"]
    for row in data["ratios"].values():
        lines.append(f"| {row['ratio']:g} | {ms(data['targeted_dense_s'])} → {ms(row['layers_factorized_s'])} "
                     f"| {row['layer_speedup']:.2f}x | {row['amdahl_step_speedup']:.2f}x "
                     f"| {row['measured_step_speedup']:.2f}x | {ms(row['step']['step_s'])} | {row['params']:,} |")
    if data.get("compiled"):
        lines += ["", "torch.compile (each model compiled alike; first step compiles):", "",
                  "| model | compile (first step) | compiled step | vs eager dense | vs compiled dense |",
                  "|---|---|---|---|---|"]
        for name, row in data["compiled"].items():
            lines.append(f"| {name} | {row['compile_s']:.1f} s | {ms(row['step']['step_s'])} "
                         f"| {row['speedup_vs_eager_dense']:.2f}x | {row['speedup_vs_compiled_dense']:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "gpt_shakespeare_zero2.yaml")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rank-ratio", default="0.25,0.5", help="comma-separated ratios of min(m, n)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (ranks run with 1)")
    parser.add_argument("--compile", action="store_true",
                        help="also time every model under torch.compile (dense and factorized alike)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    try:
        ratios = [float(r) for r in args.rank_ratio.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"--rank-ratio {args.rank_ratio!r}: expected comma-separated numbers in (0, 1]") from None
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise SystemExit(f"--rank-ratio {args.rank_ratio!r}: expected comma-separated numbers in (0, 1]")
    if args.iters < 1 or args.warmup < 0 or args.threads < 1:
        raise SystemExit("bench_step_share: --iters >= 1, --warmup >= 0, --threads >= 1")
    torch.set_num_threads(args.threads)
    data = measure(args.config, args.override, ratios, args.iters, args.warmup, compile_models=args.compile)
    print("\n".join(report(data)))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
