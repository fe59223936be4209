"""Checkpoint and resume across the switch on 2 gloo ranks (RELIABILITY scenarios 6, 7, 9, 11, 13).

Every run goes through the real `dist-lowrank train` command (tiny GPT, 12 steps, switch forced at step
8, a checkpoint every 4 steps). The reference of a resumed run is the uninterrupted run of the same job,
computed in the same test; the reference of the fp32 export is a one-process run.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.distributed.ckpt_common import BACKENDS, EXPORT, checkpoint, cli, exported, losses, summary

pytestmark = [pytest.mark.dist, pytest.mark.timeout(900)]


# Resume points per backend: right after the switch (8) on every engine, before it (4) on ZeRO-3. DDP, FSDP2
# and ZeRO-2 resume at 4 in the torchrun-restart tests (test_faults.py: the killed or failed attempt restarts
# from the step-4 checkpoint and must match the uninterrupted run bit for bit).
RESUME_POINTS = {"ddp": (8,), "fsdp2": (8,), "zero2": (8,), "zero3": (4, 8)}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_resume_before_and_right_after_the_switch_is_bitwise(backend, tmp_path, uninterrupted):
    """Scenario 6 (resume at step 4, before the switch) and 7/11 (at step 8, saved right after it): the
    resumed run switches at the same step to the same ranks, its losses equal the uninterrupted run's bit
    for bit, and its final weights (consolidated fp32 export) are identical."""
    extra = BACKENDS[backend] + EXPORT
    full = uninterrupted(backend)
    reference_losses, reference = losses(full), summary(full)
    assert reference["switch_step"] == 8 and reference["ranks"]
    manifest = json.loads((checkpoint(full, 8) / "manifest.json").read_text())
    assert manifest["phase"] == "low" and manifest["switch_step"] == 8
    assert {n: e["rank"] for n, e in manifest["layout"].items()} == reference["ranks"]
    for step in RESUME_POINTS[backend]:
        out = tmp_path / f"from{step}"
        cli(out, extra + [f"run.resume={checkpoint(full, step)}"])
        resumed = losses(out)
        assert sorted(resumed) == list(range(step + 1, 13))
        assert {s: resumed[s] for s in resumed} == {s: reference_losses[s] for s in resumed}, f"resume at {step}"
        assert summary(out)["switch_step"] == 8 and summary(out)["ranks"] == reference["ranks"]
        mine, theirs = exported(out), exported(full)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), f"weights differ after resume at {step}"


@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_export_after_the_switch_matches_the_manifest_and_one_process(backend, tmp_path, uninterrupted):
    """Scenario 13: the consolidated fp32 state dict of a sharded run has the manifest's factor shapes, and
    its effective weights U·V equal a one-process run's of the same job."""
    out, ref = uninterrupted(backend), tmp_path / "ref"
    cli(ref, ["run.backend=local", "run.world_size=1", "run.batch_size=8"] + EXPORT)
    state, ref_state = exported(out), exported(ref)
    layout = json.loads((out / "layout.json").read_text())
    manifest = json.loads((checkpoint(out, 12) / "manifest.json").read_text())
    assert layout == manifest["layout"] and layout
    for name, entry in layout.items():
        first, second = state[f"{name}.first.weight"], state[f"{name}.second.weight"]
        assert first.shape[0] == second.shape[1] == entry["rank"]
        torch.testing.assert_close(second @ first, ref_state[f"{name}.second.weight"] @ ref_state[f"{name}.first.weight"],
                                   atol=2e-4, rtol=1e-4)
    assert state.keys() == ref_state.keys()


@pytest.mark.parametrize("backend,sizes", [("ddp", (2, 1)), ("fsdp2", (1, 2)), ("zero2", (2, 1)), ("zero3", (2, 1))])
def test_world_size_change_on_resume(backend, sizes, tmp_path, uninterrupted):
    """Scenario 9: a checkpoint taken after the switch on `before` ranks resumes on `after` ranks (the same
    global batch): DDP from plain state dicts, FSDP2 through torch.distributed.checkpoint, DeepSpeed through
    its universal checkpoint (converted on resume). The layout comes back from the manifest and the losses
    follow the uninterrupted run's (Adam moments and per-group steps included, or step 10 would differ)."""
    before, after = sizes
    batch = {1: 8, 2: 4}
    if before == 2:
        first = uninterrupted(backend)
    else:
        first = tmp_path / "first"
        cli(first, BACKENDS[backend] + EXPORT + [f"run.world_size={before}", f"run.batch_size={batch[before]}"])
    out = tmp_path / "resumed"
    cli(out, BACKENDS[backend] + EXPORT + [f"run.world_size={after}", f"run.batch_size={batch[after]}",
                                           f"run.resume={checkpoint(first, 8)}"])
    assert summary(out)["world_size"] == after and summary(out)["ranks"] == summary(first)["ranks"]
    reference, resumed = losses(first), losses(out)
    assert sorted(resumed) == list(range(9, 13))
    for step, value in resumed.items():
        assert value == pytest.approx(reference[step], abs=1e-4), f"step {step}"


INRANK = ["lowrank.strategy=inrank", "lowrank.inrank.init_rank=2", "lowrank.inrank.warmup=2", "lowrank.inrank.gap=2",
          "lowrank.inrank.buffer=4", "lowrank.inrank.capacity_multiple=2", "lowrank.inrank.tau=0.5", "run.lr=0.01"]


@pytest.mark.parametrize("backend", ["zero3"])
def test_resume_after_inrank_growth_is_bitwise(backend, tmp_path):
    """Scenario 8: ranks grow past capacity at steps 2 and 6 (reshards); resuming at step 4 (after the
    first growth, before the second) gives the uninterrupted run's losses bit for bit and the same growth
    decisions, the second growth included; the manifest records every layer's width and capacity."""
    extra = BACKENDS[backend] + INRANK
    full = tmp_path / "full"
    cli(full, extra)
    grows = [json.loads(line) for line in (full / "events.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "grow"]
    assert [g["step"] for g in grows if g["capacities"]][:2] == [2, 6], grows
    layout = json.loads((checkpoint(full, 4) / "manifest.json").read_text())["layout"]
    assert all(e["type"] == "inrank" for e in layout.values()) and max(e["capacity"] for e in layout.values()) > 2
    out = tmp_path / "from4"
    cli(out, extra + [f"run.resume={checkpoint(full, 4)}"])
    assert losses(out) == {s: v for s, v in losses(full).items() if s > 4}
    assert summary(out)["ranks"] == summary(full)["ranks"]
    regrown = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()
               if json.loads(line)["event"] == "grow"]
    assert [g["step"] for g in regrown if g["capacities"]][:1] == [6], regrown


@pytest.mark.parametrize("backend", ["zero3"])
def test_loading_into_the_wrong_layer_shapes_fails_naming_the_layer(backend, tmp_path, uninterrupted):
    """Scenario 8, second half: a manifest whose layer rank disagrees with the saved tensors is refused with
    a CheckpointError that names the layer, on every rank, before training starts."""
    full = tmp_path / "full"
    shutil.copytree(uninterrupted(backend), full)
    path = checkpoint(full, 8) / "manifest.json"
    manifest = json.loads(path.read_text())
    layer = sorted(manifest["layout"])[0]
    manifest["layout"][layer]["rank"] += 1
    path.write_text(json.dumps(manifest))
    proc = cli(tmp_path / "bad", BACKENDS[backend] + EXPORT + [f"run.resume={checkpoint(full, 8)}"], check=False)
    assert proc.returncode != 0
    for rank in (0, 1):
        mine = [line for line in proc.stderr.splitlines() if f"dist-lowrank: error: [rank {rank}]" in line]
        assert mine and "CheckpointError" in mine[0] and layer in mine[0], proc.stderr[-3000:]
