"""Workers for test_telemetry_api: the README's telemetry example on real ranks (spawn harness)."""
from __future__ import annotations


def deepspeed_telemetry(rank: int, world: int, out_dir: str):
    from examples.telemetry_report import deepspeed_main

    return deepspeed_main(out_dir)


def fsdp2_telemetry(rank: int, world: int, out_dir: str):
    from examples.telemetry_report import fsdp2_main

    return fsdp2_main(out_dir)
