"""`dist-lowrank train CONFIG [--override key=value ...]` and `dist-lowrank report RUN_DIR`."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from dist_lowrank.errors import DistLowRankError
from dist_lowrank.launch_env import discover


def _train(args: argparse.Namespace) -> int:
    from dist_lowrank.train.config_file import load_train_config
    from dist_lowrank.train.launch_local import run_training

    run, lowrank = load_train_config(args.config, args.override)
    summary = run_training(run, lowrank)
    if summary is not None:
        print(json.dumps(summary, indent=2))
    return 0


def _report(args: argparse.Namespace) -> int:
    from dist_lowrank.telemetry.report import render_markdown, write_report

    print(render_markdown(write_report(args.run_dir)), end="")
    print(f"written: {args.run_dir}/report.md, report.json, srank.png, savings.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dist-lowrank", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a reference task with a low-rank strategy")
    train.add_argument("config", help="YAML/JSON file with `run` and `lowrank` sections")
    train.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                       help="dotted override, e.g. lowrank.strategy=none (repeatable)")
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    report = sub.add_parser("report", help="Markdown/JSON report and PNG plots of a finished run")
    report.add_argument("run_dir", help="the run's out_dir (holds events.jsonl)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    code = _run(args)
    if args.command == "train" and _launched_rank():
        from dist_lowrank.train.launch_local import end_rank_process

        end_rank_process(code)
    return code


def _launched_rank() -> bool:
    """This process is a rank that torchrun, deepspeed, SLURM or mpirun started (it ends with the job's group)."""
    try:
        return discover() is not None
    except DistLowRankError:  # a malformed launcher environment: _run has reported it already
        return False


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "report":
            return _report(args)
    except DistLowRankError as exc:
        print(f"dist-lowrank: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
