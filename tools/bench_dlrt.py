"""DLRT on Fashion-MNIST's 784-500-300-100-10 MLP: accuracy, compression and time per step vs dense, one invocation.

    python tools/bench_dlrt.py [--steps 600] [--thetas 0.05 0.1 0.15 0.2 0.3] [--integrators parallel kls]

Every row trains the same model with the same recipe (configs/dlrt_mlp_fmnist.yaml's run section, one process), so
the ratios are measured in one run. Compression counts what a DLRT layer represents (U, S, V: (m+n)r + r²) against
the dense m·n of the three targeted layers, at the final ranks (the paper's convention); `physical` also counts K, L
(the optimizer's working copies) at the final capacities."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIMS = {"1": (500, 784), "3": (300, 500), "5": (100, 300)}


def run(overrides: list[str], out: Path) -> dict:
    from dist_lowrank.train.config_file import load_train_config
    from dist_lowrank.train.loop import train

    run_cfg, lowrank = load_train_config(ROOT / "configs" / "dlrt_mlp_fmnist.yaml",
                                         ["run.backend=local", "run.world_size=1", f"run.out_dir={out}",
                                          "run.eval_every=0", *overrides])
    return train(run_cfg, lowrank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--thetas", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.3])
    parser.add_argument("--integrators", nargs="+", default=["parallel"])
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every row (e.g. run.lr=0.05)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = [f"run.steps={args.steps}", "run.batch_size=128", *args.extra]
        dense = run(base + ["lowrank.strategy=none"], Path(tmp) / "dense")
        rows.append(("dense", "-", dense, 1.0))
        for integ in args.integrators:
            for theta in args.thetas:
                summary = run(base + [f"lowrank.dlrt.theta={theta}", f"lowrank.dlrt.integrator={integ}"],
                              Path(tmp) / f"{integ}-{theta}")
                rows.append((integ, theta, summary, summary["final_eval"]["train_s"] / dense["final_eval"]["train_s"]))
    full = sum(m * n for m, n in DIMS.values())
    print("| run | theta | val acc | ranks (final) | compression (U,S,V) | s/step | time vs dense |")
    print("|---|---|---|---|---|---|---|")
    for name, theta, summary, ratio in rows:
        ranks = summary.get("ranks") or {}
        kept = sum((m + n) * ranks[k] + ranks[k] ** 2 for k, (m, n) in DIMS.items()) if ranks else full
        step_s = summary["final_eval"]["train_s"] / args.steps
        print(f"| {name} | {theta} | {summary['final_eval']['val_acc']:.4f} | {json.dumps(ranks)} | "
              f"{1 - kept / full:.1%} | {step_s * 1000:.1f} ms | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
