"""Every config in configs/ is validated and smoke-run through the real `dist-lowrank train` command (or, where
another test already runs the same path through it, named in RUN_ELSEWHERE).

Each run is shrunk by overrides (tiny model, a few steps, a forced early switch) and started exactly as a
user would start it: the CLI spawns the config's world size of gloo ranks. Its decisions and first logged
loss are compared with a one-process run of the same job (local backend, the same global batches),
computed in the same test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_lowrank.train.config_file import load_train_config
from dist_lowrank.train.loop import train

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# Configs whose path (task, engine, strategy through the CLI) another test already runs: validated here, not
# smoke-run twice (one case per path keeps the suite short). The value names the test that runs it.
RUN_ELSEWHERE = {
    "demo": "tests/unit/test_training.py (the same config, 160 steps, against its full-rank run)",
    "dlrt_mlp_fmnist": "tests/distributed/test_dlrt_resume.py (through the CLI on 2 ranks)",
    "gpt_shakespeare_fullrank": "tests/unit/test_bench_tools.py::test_bench_end_to_end_tiny (full rank through the "
                                "CLI on ZeRO-2) and test_baseline_is_the_main_job_without_lowrank",
    "tensor_mlp_fmnist": "tests/distributed/test_tensor_resume.py (through the CLI on 2 ranks)",
}
SMOKE = [p for p in CONFIGS if p.stem not in RUN_ELSEWHERE]
CLI = Path(sys.executable).parent / "dist-lowrank"

SHRINK = {
    "shakespeare_gpt": ["run.batch_size=4", "run.block_size=32", "run.n_layer=1", "run.n_head=2", "run.n_embd=32",
                        "run.eval_samples=16"],
    "fmnist_cnn": ["run.batch_size=8", "run.width=16", "run.hidden=128", "run.limit_train=512",
                   "run.eval_samples=200"],
    "fmnist_mlp": ["run.batch_size=8", "run.limit_train=512", "run.eval_samples=200"],
    "fmnist_lenet": ["run.batch_size=8", "run.limit_train=512", "run.eval_samples=200"],
    "fmnist_mlp512": ["run.batch_size=8", "run.limit_train=512", "run.eval_samples=200"],
}
STRATEGY = {
    "cuttlefish": ["lowrank.monitor.cadence_steps=2", "lowrank.cuttlefish.min_switch_step=0",
                   "lowrank.cuttlefish.max_switch_step=4", "lowrank.switch.profile_layers=false",
                   "lowrank.cuttlefish.search_above_saving=false",  # needs profile_layers
                   "lowrank.cuttlefish.rank_rule=raw"],  # at width 32 the scaled rule saves nothing
    "inrank": ["lowrank.inrank.warmup=2", "lowrank.inrank.gap=2"],
    "dlrt": ["lowrank.dlrt.init_rank=8"],
    "tensor": ["lowrank.tensor.init_rank=4", "lowrank.tensor.no_kl_steps=0", "lowrank.tensor.warmup=0",
               "lowrank.tensor.prune_after=3", "lowrank.tensor.prune_every=3", "lowrank.tensor.threshold=1e9",
               "lowrank.tensor.min_rank=3"],  # a prune at step 3 (every bond loses its smallest-λ slot)
    "none": [],
}


def _overrides(path: Path, out: Path) -> list[str]:
    run, lowrank = load_train_config(path)
    return (["run.steps=6", "run.log_every=2", "run.eval_every=0", f"run.out_dir={out}"]
            + SHRINK[run.task] + STRATEGY.get(lowrank.strategy, []))


def _losses(out: Path) -> dict[int, float]:
    events = map(json.loads, (out / "events.jsonl").read_text().splitlines())
    return {e["step"]: e["loss"] for e in events if e["event"] == "train"}


def test_the_config_set_covers_every_engine_and_strategy():
    kinds = set()
    for path in CONFIGS:
        run, lowrank = load_train_config(path)  # strict: unknown keys / bad values raise
        engine = f"zero{run.zero_stage}" if run.backend == "deepspeed" else run.backend
        kinds.add((run.task, engine, lowrank.strategy))
    wanted = {("shakespeare_gpt", "zero2", "cuttlefish"), ("shakespeare_gpt", "zero3", "cuttlefish"),
              ("shakespeare_gpt", "fsdp2", "cuttlefish"), ("fmnist_cnn", "ddp", "cuttlefish"),
              ("shakespeare_gpt", "zero2", "none")}
    assert wanted <= kinds, f"missing configs for {wanted - kinds}"
    assert any(strategy == "inrank" for _, _, strategy in kinds)


def test_baseline_is_the_main_job_without_lowrank():
    main = yaml.safe_load((ROOT / "configs" / "gpt_shakespeare_zero2.yaml").read_text())
    base = yaml.safe_load((ROOT / "configs" / "gpt_shakespeare_fullrank.yaml").read_text())
    assert {k: v for k, v in main["run"].items() if k != "out_dir"} == \
           {k: v for k, v in base["run"].items() if k != "out_dir"}
    assert base["lowrank"]["strategy"] == "none"


def test_configs_run_elsewhere_exist():
    assert set(RUN_ELSEWHERE) <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", SMOKE, ids=[p.stem for p in SMOKE])
def test_config_smoke_run_matches_one_process(path: Path, tmp_path: Path):
    out, ref_out = tmp_path / "run", tmp_path / "ref"
    run, lowrank = load_train_config(path)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([str(CLI), "train", str(path), *sum((["--override", o] for o in _overrides(path, out)), [])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"{path.name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads((out / "summary.json").read_text())

    ref_run, ref_lowrank = load_train_config(path, _overrides(path, ref_out) + [
        "run.backend=local", "run.world_size=1", f"run.batch_size={int(_shrunk(path, 'batch_size')) * run.world_size}"])
    reference = train(ref_run, ref_lowrank)

    assert summary["world_size"] == run.world_size and summary["strategy"] == lowrank.strategy
    assert summary["switch_step"] == reference["switch_step"]
    assert summary["ranks"] == reference["ranks"]
    assert summary["params_final"] == reference["params_final"]
    # The GPT has no batch-dependent layer: the mean of the ranks' losses is the global batch's loss. The CNN's
    # BatchNorm normalizes each rank's 8 samples on its own (as DDP does), the reference all 16 together.
    tolerance = 2e-4 if run.task == "shakespeare_gpt" else 5e-2
    assert _losses(out)[2] == pytest.approx(_losses(ref_out)[2], abs=tolerance)
    if lowrank.strategy == "cuttlefish":
        assert summary["switch_step"] is not None and summary["switch_step"] <= 4
        assert summary["params_final"] < summary["params_full"]
    elif lowrank.strategy == "none":
        assert summary["switch_step"] is None and summary["params_final"] == summary["params_full"]
    else:
        assert summary["ranks"], "InRank and DLRT layers report their ranks"
    assert (out / "report.md").exists() and list((out / "tb").glob("events.out.tfevents.*"))


def _shrunk(path: Path, key: str) -> str:
    run, _ = load_train_config(path)
    return next(o.split("=", 1)[1] for o in SHRINK[run.task] if o.startswith(f"run.{key}="))
