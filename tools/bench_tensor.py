"""Tensorized layers with Bayesian rank pruning (issue 17) against the dense model, per format, in one invocation.

Runs the real `dist-lowrank train` on a tensor config once dense (`lowrank.strategy=none`) and once per format, and
reads each run's summary and events: the final validation accuracy (MLP) or loss (GPT), the trained parameters and
the compression against the dense model (1 − params / dense params), the ranks left after pruning, the training time.

    python tools/bench_tensor.py --model mlp [--formats cp,tucker,tt,ttm] [--steps 1000] [--json out.json]
        (configs/tensor_mlp_fmnist.yaml: the paper's MNIST setting, 784-512-10, on Fashion-MNIST, 2 DDP ranks;
         rank 20, CP 50 as in the reference)
    python tools/bench_tensor.py --model gpt [--steps 400]
        (configs/tensor_gpt_shakespeare.yaml: the demo GPT with TT-matrix embedding and LM head, TT MLP layers)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ROOT, machine, read_events, train_run  # noqa: E402

CONFIGS = {"mlp": ROOT / "configs" / "tensor_mlp_fmnist.yaml", "gpt": ROOT / "configs" / "tensor_gpt_shakespeare.yaml"}
# per format beyond the config: CP at the reference's MNIST rank 50; Tucker over 2 modes per side at rank 8 (its
# ranks are clipped to the modes, so over 3 modes of 7-16 at rank 20 its core is as large as the dense matrix);
# TT and TT-matrix at the config's (the reference's) rank 20
EXTRA = {"cp": ["lowrank.tensor.init_rank=50"], "tucker": ["lowrank.tensor.init_rank=8", "lowrank.tensor.n_modes=2"]}


def run_one(config: Path, overrides: list[str], out: Path, label: str) -> dict:
    summary, _ = train_run(config, overrides, out, f"bench_tensor: {label}")
    final = summary.get("final_eval") or {}
    updates = read_events(out, "rank_update")
    return {"params": summary["trainable_params_final"], "val_acc": final.get("val_acc"),
            "val_loss": final.get("val_loss"), "train_s": final.get("train_s"), "wall_s": summary["wall_seconds"],
            "slots": updates[-1]["slots"] if updates else None, "prunes": len(read_events(out, "prune"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="mlp")
    parser.add_argument("--formats", default=None, help="comma-separated (default: mlp all four, gpt the config's)")
    parser.add_argument("--steps", type=int, default=None, help="run.steps (default: the config's)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    config = CONFIGS[args.model]
    common = ([f"run.steps={args.steps}", f"run.eval_every={args.steps}"] if args.steps else []) + args.override
    formats = (args.formats or ("cp,tucker,tt,ttm" if args.model == "mlp" else "config")).split(",")
    variants = {"dense": ["lowrank.strategy=none"]}
    for fmt in formats:
        variants[fmt] = [] if fmt == "config" else [f"lowrank.tensor.format={fmt}", *EXTRA.get(fmt, [])]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, items in variants.items():
            results[name] = run_one(config, items + common, Path(tmp) / name, name)
            print(f"  {name}: {results[name]}", flush=True)
    dense = results["dense"]["params"]
    metric = "val_acc" if args.model == "mlp" else "val_loss"
    print(f"\nconfig {config.name} {' '.join(common)}\n")
    print(f"| variant | {metric} | params | compression | ranks after pruning | prunes | train s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        r["compression"] = 1 - r["params"] / dense
        slots = "—" if not r["slots"] else "; ".join(f"{n}: {s}" for n, s in r["slots"].items())
        print(f"| {name} | {r[metric]:.4f} | {r['params']:,} | {100 * r['compression']:.1f}% | {slots} | "
              f"{r['prunes']} | {r['train_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "config": str(config), "overrides": common,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
