"""Per-step communication and parameter memory per rank at world sizes that cannot run here, full vs low rank.

The comm test checks telemetry.analytic against the measured byte counter on 2 ranks; this tool applies
the same model (and telemetry.memory_model for weights + grads + Adam states) to real model shapes, so the
saving of a rank plan can be read off per backend before anyone rents 1024 GPUs. Shapes are built in code
(no downloads, no torch): GPT-2 small/medium/large/xl (weights in nn.Linear layout (out, in), as
dist_lowrank.models.gpt; lm_head tied to wte, so not counted) and torchvision's ResNet-50 (BN affine
parameters only; running statistics are buffers). A factorized layer holds the shapes LowRankLinear /
LowRankConv2d build: (r, in[, kh, kw]) and (out, r[, 1, 1]), bias kept.

    python tools/comm_at_scale.py --model gpt2-small --rank-ratio 0.25 --world 8,64,1024 [--json out.json]
    python tools/comm_at_scale.py --model resnet50 --plan plan.json   # {layer_name: rank} or a saved Plan
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import NoReturn, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dist_lowrank.telemetry.analytic import expected_step_bytes  # noqa: E402
from dist_lowrank.telemetry.memory_model import BACKENDS, param_state_bytes  # noqa: E402

Shape = tuple[int, ...]
GPT2 = {"gpt2-small": (12, 768), "gpt2-medium": (24, 1024), "gpt2-large": (36, 1280), "gpt2-xl": (48, 1600)}
MODELS = (*GPT2, "resnet50")
MB = 1e6


class InputError(Exception):
    """Bad user input; main prints it as one line and exits 2."""


@dataclass(frozen=True)
class Layer:
    """One module's parameters: `weight` is factorizable when `target`; `extra` (bias, norms) never changes."""

    name: str
    weight: Shape
    extra: tuple[Shape, ...] = ()
    target: bool = False

    @property
    def dims(self) -> tuple[int, int]:
        """(m, n) = (out, in·kh·kw), the matrix the rank refers to (layers.shapes.matrix_dims)."""
        return self.weight[0], math.prod(self.weight[1:])

    def shapes(self, rank: Optional[int] = None) -> list[Shape]:
        """Parameter shapes, dense (rank None) or as the factorized module holds them."""
        if rank is None:
            return [self.weight, *self.extra]
        out, inp, *kernel = self.weight
        first = (rank, inp, *kernel)
        second = (out, rank, *([1] * len(kernel)))
        return [first, second, *self.extra]


def gpt2(n_layer: int, d: int, vocab: int = 50257, n_ctx: int = 1024) -> list[Layer]:
    """GPT-2: wte, wpe, n_layer blocks (2 LayerNorms, c_attn, attn c_proj, c_fc, mlp c_proj), ln_f."""
    mods = [Layer("wte", (vocab, d)), Layer("wpe", (n_ctx, d))]
    for i in range(n_layer):
        h = f"h.{i}"
        mods += [Layer(f"{h}.ln_1", (d,), ((d,),)),
                 Layer(f"{h}.attn.c_attn", (3 * d, d), ((3 * d,),), True),
                 Layer(f"{h}.attn.c_proj", (d, d), ((d,),), True),
                 Layer(f"{h}.ln_2", (d,), ((d,),)),
                 Layer(f"{h}.mlp.c_fc", (4 * d, d), ((4 * d,),), True),
                 Layer(f"{h}.mlp.c_proj", (d, 4 * d), ((d,),), True)]
    return mods + [Layer("ln_f", (d,), ((d,),))]


def _conv_bn(name: str, bn: str, cin: int, cout: int, k: int, target: bool = True) -> list[Layer]:
    return [Layer(name, (cout, cin, k, k), (), target), Layer(bn, (cout,), ((cout,),))]


def resnet50(num_classes: int = 1000) -> list[Layer]:
    """torchvision resnet50: 7×7 stem (not targeted), Bottleneck [3, 4, 6, 3] (stride on the 3×3), fc."""
    mods = _conv_bn("conv1", "bn1", 3, 64, 7, target=False)
    cin = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            mods += _conv_bn(f"{p}.conv1", f"{p}.bn1", cin, planes, 1)
            mods += _conv_bn(f"{p}.conv2", f"{p}.bn2", planes, planes, 3)
            mods += _conv_bn(f"{p}.conv3", f"{p}.bn3", planes, 4 * planes, 1)
            if b == 0:
                mods += _conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", cin, 4 * planes, 1)
            cin = 4 * planes
    return mods + [Layer("fc", (num_classes, 2048), ((num_classes,),), True)]


def build_model(name: str) -> list[Layer]:
    if name in GPT2:
        return gpt2(*GPT2[name])
    if name == "resnet50":
        return resnet50()
    raise InputError(f"--model: unknown model {name!r}; allowed: {', '.join(MODELS)}")


def ratio_ranks(mods: list[Layer], ratio: Fraction) -> dict[str, int]:
    """rank = ceil(ratio · min(m, n)) for every targeted layer (exact: ratio is a decimal Fraction)."""
    return {t.name: math.ceil(ratio * min(t.dims)) for t in mods if t.target}


def load_plan(path: str, mods: list[Layer]) -> dict[str, int]:
    """{layer: rank} from a JSON file ({name: rank}, or a saved Plan's "ranks"); every error names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"--plan {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"--plan {path}: not readable JSON ({str(exc).splitlines()[0]})") from None
    if isinstance(data, dict) and isinstance(data.get("ranks"), dict):
        data = data["ranks"]
    if not isinstance(data, dict) or not data:
        raise InputError(f"--plan {path}: expected a non-empty JSON object {{layer_name: rank}}")
    targets = {t.name: t for t in mods if t.target}
    plan = {}
    for name, rank in data.items():
        if name not in targets:
            example = next(iter(targets))
            raise InputError(f"--plan {path}: unknown layer {name!r} (not a targeted layer; e.g. {example!r})")
        m, n = targets[name].dims
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
            raise InputError(f"--plan {path}: layer {name!r}: rank {rank!r} not in 1..{min(m, n)} "
                             f"for its {m}x{n} weight")
        plan[name] = rank
    return plan


def apply_plan(mods: list[Layer], ranks: dict[str, int]) -> tuple[list[Shape], list[Shape], dict[str, int]]:
    """(dense shapes, low-rank shapes, counts). A planned layer stays dense unless r(m+n) < mn
    (layers.shapes.saves_parameters): factorizing it would add parameters."""
    full, low = [], []
    counts = {"targeted": sum(t.target for t in mods), "factorized": 0, "kept_dense": 0}
    for t in mods:
        full += t.shapes()
        rank = ranks.get(t.name)
        m, n = t.dims
        if rank is not None and rank * (m + n) < m * n:
            low += t.shapes(rank)
            counts["factorized"] += 1
        else:
            low += t.shapes()
            counts["kept_dense"] += rank is not None
    return full, low, counts


def numel(shapes: list[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)


def at_scale(full: list[Shape], low: list[Shape], worlds: list[int], bytes_per_elem: int = 4,
             zero3_gathers: int = 1) -> dict[str, dict[str, dict]]:
    """{world: {backend: comm and memory per rank, full and low, with ratios}} from the two shape lists."""
    result: dict[str, dict[str, dict]] = {}
    for p in worlds:
        rows = {}
        for backend in BACKENDS:
            ops_full = expected_step_bytes(backend, full, p, bytes_per_elem, zero3_gathers)
            ops_low = expected_step_bytes(backend, low, p, bytes_per_elem, zero3_gathers)
            mem_full = param_state_bytes(backend, full, p, grad_bytes=bytes_per_elem)
            mem_low = param_state_bytes(backend, low, p, grad_bytes=bytes_per_elem)
            comm_full, comm_low = sum(ops_full.values()), sum(ops_low.values())
            rows[backend] = {"comm_full_bytes": comm_full, "comm_low_bytes": comm_low,
                             "comm_ratio": comm_full / comm_low, "comm_full_ops": ops_full, "comm_low_ops": ops_low,
                             "mem_full_bytes": mem_full["total"], "mem_low_bytes": mem_low["total"],
                             "mem_ratio": mem_full["total"] / mem_low["total"], "mem_full": mem_full,
                             "mem_low": mem_low}
        result[str(p)] = rows
    return result


def markdown(report: dict) -> str:
    """A header line and one table per world size."""
    s = report["summary"]
    lines = [f"## {report['model']}, {report['plan']}",
             "",
             f"Parameters {s['params_full']:,} full → {s['params_low']:,} low rank "
             f"({s['params_full'] / s['params_low']:.3f}×).",
             f"{s['factorized']} layers factorized, {s['kept_dense']} planned layers stayed dense (r(m+n) ≥ mn); "
             f"{s['targeted']} targetable.",
             f"comm = MB each rank sends per optimizer step at {report['bytes_per_elem']} B/elem "
             f"(ZeRO-3: {report['zero3_gathers']} gather/step);",
             f"mem = MB of weights (fp32) + grads ({report['bytes_per_elem']} B) + Adam moments (2×fp32) per rank; "
             f"MB = 10^6 B.",
             ""]
    for world, rows in report["worlds"].items():
        lines += [f"### world {world}", "",
                  "| backend | comm full | comm low | comm full/low | mem full | mem low | mem full/low |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for backend, r in rows.items():
            lines.append(f"| {backend} | {r['comm_full_bytes'] / MB:,.2f} | {r['comm_low_bytes'] / MB:,.2f} "
                         f"| {r['comm_ratio']:.3f} | {r['mem_full_bytes'] / MB:,.2f} "
                         f"| {r['mem_low_bytes'] / MB:,.2f} | {r['mem_ratio']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def _ratio(text: str) -> Fraction:
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _worlds(text: str) -> list[int]:
    try:
        worlds = [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not worlds or min(worlds) < 2:
        raise argparse.ArgumentTypeError(f"every world size must be >= 2, got {text!r}")
    return worlds


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other bad input here."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: Optional[list[str]] = None) -> int:
    parser = _Parser(prog="comm_at_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="gpt2-small")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--rank-ratio", type=_ratio, default=None,
                       help="rank = ceil(ratio·min(m, n)) on every targeted layer (default 0.25)")
    group.add_argument("--plan", help="JSON {layer_name: rank}; unlisted layers stay dense")
    parser.add_argument("--world", type=_worlds, default=[8, 64, 256, 1024], help="e.g. 8,64,1024")
    parser.add_argument("--bytes", type=int, choices=(2, 4), default=4, help="bytes per gradient/comm element")
    parser.add_argument("--zero3-gathers", type=int, choices=(1, 2), default=1,
                        help="ZeRO-3 all-gathers per step (2: re-gathered in backward)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    try:
        mods = build_model(args.model)
        if args.plan is not None:
            ranks, plan_desc = load_plan(args.plan, mods), f"plan {os.path.basename(args.plan)}"
        else:
            ratio = args.rank_ratio if args.rank_ratio is not None else Fraction(1, 4)
            ranks, plan_desc = ratio_ranks(mods, ratio), f"rank ratio {float(ratio):g}"
        full, low, counts = apply_plan(mods, ranks)
        report = {"model": args.model, "plan": plan_desc, "bytes_per_elem": args.bytes,
                  "zero3_gathers": args.zero3_gathers, "ranks": ranks,
                  "summary": {"params_full": numel(full), "params_low": numel(low), **counts},
                  "worlds": at_scale(full, low, args.world, args.bytes, args.zero3_gathers)}
        if args.json:
            try:
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(report, f, indent=1)
            except OSError as exc:
                raise InputError(f"--json {args.json}: cannot write ({exc.strerror})") from None
        print(markdown(report))
    except InputError as exc:
        print(f"comm_at_scale: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
