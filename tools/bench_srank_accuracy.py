"""Accuracy and cost of stable-rank estimators on random GPT-2-small-shaped weights.

Random init is the hard case for σ_max estimation (flat top of the spectrum), and it is exactly where
Cuttlefish measures its scale ξ. Reports, per method, the worst and mean relative srank error vs the
exact SVD and the time per estimate (single matrix, `stable_rank`).

    python tools/bench_srank_accuracy.py [--per-shape 3] [--threads 1] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # c_attn, c_proj, c_fc, mlp c_proj (out × in)
METHODS = [("lanczos", 10), ("lanczos", 20), ("lanczos", 30), ("power", 10), ("power", 20), ("power", 50)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-shape", type=int, default=3, help="random weights per GPT-2 shape")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from dist_lowrank.linalg import stable_rank

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    weights = [torch.randn(m, n, generator=gen) * 0.02 for m, n in SHAPES for _ in range(args.per_shape)]

    start = time.perf_counter()
    exact = [stable_rank(w, "exact").value for w in weights]
    exact_time = (time.perf_counter() - start) / len(weights)

    rows = [("exact (svdvals)", 0.0, 0.0, exact_time)]
    for method, steps in METHODS:
        errors, start = [], time.perf_counter()
        for w, ref in zip(weights, exact):
            errors.append(abs(stable_rank(w, method, steps).value - ref) / ref)
        per = (time.perf_counter() - start) / len(weights)
        rows.append((f"{method} {steps} steps", max(errors), sum(errors) / len(errors), per))

    print(f"{len(weights)} random weights ({args.per_shape} each of {', '.join(f'{m}x{n}' for m, n in SHAPES)}), "
          f"{args.threads} thread(s), srank {min(exact):.1f}..{max(exact):.1f}")
    print(f"{'method':<18} {'worst rel err':>14} {'mean rel err':>13} {'s/estimate':>11}")
    for name, worst, mean, per in rows:
        print(f"{name:<18} {worst:>14.2e} {mean:>13.2e} {per:>11.4f}")


if __name__ == "__main__":
    main()
