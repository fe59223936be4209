"""DLRT on Fashion-MNIST (the paper's MLP and LeNet-5): accuracy, compression and time per step vs dense, one invocation.

    python tools/bench_dlrt.py [--model mlp|lenet] [--steps 1000] [--thetas 0.05 0.1 0.15 0.2 0.3]
                               [--integrators parallel kls] [--moments rotate reset]

Every row trains the same model with the same recipe (configs/dlrt_<model>_fmnist.yaml's run section, one process),
so the ratios are measured in one run. Compression counts what a DLRT layer represents (U, S, V: (m+n)r + r²) against
the dense m·n of the targeted layers, at the final ranks (the paper's convention). Rows with `--moments reset` are
run at the first theta only (rotate vs reset of the optimizer moments across a basis change)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"mlp": "dlrt_mlp_fmnist.yaml", "lenet": "dlrt_lenet_fmnist.yaml"}


def run(config: Path, overrides: list[str], out: Path) -> dict:
    from dist_lowrank.train.config_file import load_train_config
    from dist_lowrank.train.loop import train

    run_cfg, lowrank = load_train_config(config, ["run.backend=local", "run.world_size=1", f"run.out_dir={out}",
                                                  "run.eval_every=0", *overrides])
    return train(run_cfg, lowrank)


def target_dims(config: Path) -> dict[str, tuple[int, int]]:
    """(m, n) of every targeted layer, read from the task's dense model."""
    from dist_lowrank.layers import matrix_dims
    from dist_lowrank.targeting import select_targets
    from dist_lowrank.train.config_file import load_train_config
    from dist_lowrank.train.tasks import build_task

    run_cfg, lowrank = load_train_config(config, ["run.limit_train=64", "run.eval_samples=64"])
    model = build_task(run_cfg).model_fn()
    return {n: matrix_dims(m) for n, m in select_targets(model, lowrank.target_modules,
                                                         lowrank.exclude_modules).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="mlp")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--thetas", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.3])
    parser.add_argument("--integrators", nargs="+", default=["parallel", "kls"])
    parser.add_argument("--moments", nargs="+", default=["rotate"])
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every row (e.g. run.lr=0.05)")
    args = parser.parse_args()
    config = ROOT / "configs" / CONFIGS[args.model]
    dims = target_dims(config)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = [f"run.steps={args.steps}", "run.batch_size=128", *args.extra]
        dense = run(config, base + ["lowrank.strategy=none"], Path(tmp) / "dense")
        rows.append(("dense", "-", "-", dense))
        for integ in args.integrators:
            for moments in args.moments:
                for theta in args.thetas if moments == args.moments[0] else args.thetas[:1]:
                    summary = run(config, base + [f"lowrank.dlrt.theta={theta}", f"lowrank.dlrt.integrator={integ}",
                                                  f"lowrank.dlrt.moments={moments}"], Path(tmp) / f"{integ}-{theta}")
                    rows.append((integ, theta, moments, summary))
    full = sum(m * n for m, n in dims.values())
    dense_s = dense["final_eval"]["train_s"]
    print(f"model {args.model}, {args.steps} steps, batch 128, one process; dense targeted weights {full:,}")
    print("| run | theta | moments | val acc | ranks (final) | compression (U,S,V) | ms/step | time vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for name, theta, moments, summary in rows:
        ranks = summary.get("ranks") or {}
        kept = sum((m + n) * ranks[k] + ranks[k] ** 2 for k, (m, n) in dims.items()) if ranks else full
        train_s = summary["final_eval"]["train_s"]
        print(f"| {name} | {theta} | {moments} | {summary['final_eval']['val_acc']:.4f} | {json.dumps(ranks)} | "
              f"{1 - kept / full:.1%} | {train_s / args.steps * 1000:.1f} | {train_s / dense_s:.2f}× |")


if __name__ == "__main__":
    main()
