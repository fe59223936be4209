"""tools/comm_at_scale.py: model shapes add up to the published parameter counts, DDP comm and the low-rank
parameter count match arithmetic done here independently, and the CLI's JSON / error contract holds."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "comm_at_scale.py")


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("comm_at_scale", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _shapes(tool, model, ratio="0.25"):
    from fractions import Fraction

    mods = tool.build_model(model)
    return tool.apply_plan(mods, tool.ratio_ranks(mods, Fraction(ratio)))


def test_published_parameter_counts(tool):
    assert tool.numel(_shapes(tool, "gpt2-small")[0]) == 124_439_808  # lm_head tied to wte
    assert tool.numel(_shapes(tool, "resnet50")[0]) == 25_557_032


def _gpt2_small_low_params() -> int:
    """By hand: every block Linear at rank ceil(d/4) = 192 as (r, in) + (out, r) + bias; the rest dense."""
    d, r, vocab, ctx, layers = 768, 192, 50257, 1024, 12
    linears = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]  # (out, in)
    block = sum(r * (out + inp) + out for out, inp in linears) + 2 * 2 * d  # + ln_1, ln_2
    return vocab * d + ctx * d + layers * block + 2 * d


def test_ddp_comm_and_low_rank_ratio(tool):
    full, low, counts = _shapes(tool, "gpt2-small")
    assert counts == {"targeted": 48, "factorized": 48, "kept_dense": 0}
    p_full, p_low = 124_439_808, _gpt2_small_low_params()
    assert tool.numel(low) == p_low == 67_816_704
    worlds = [8, 64, 1024]
    report = tool.at_scale(full, low, worlds)
    for p in worlds:
        ddp = report[str(p)]["ddp"]
        assert ddp["comm_full_bytes"] == pytest.approx(2 * (p - 1) / p * 4 * p_full, rel=1e-12)
        assert ddp["comm_low_bytes"] == pytest.approx(2 * (p - 1) / p * 4 * p_low, rel=1e-12)
        assert ddp["comm_ratio"] > 1
        assert abs(ddp["comm_ratio"] - p_full / p_low) < 1e-9
        assert ddp["mem_full_bytes"] == 16 * p_full  # fp32 weights + grads + two Adam moments
        for row in report[str(p)].values():
            assert row["comm_ratio"] > 1 and row["mem_ratio"] > 1


def test_layers_that_would_grow_stay_dense(tool):
    full, low, counts = _shapes(tool, "resnet50", ratio="1")
    assert counts["factorized"] == 0 and counts["kept_dense"] == counts["targeted"] == 53
    assert low == full


def test_cli_json_round_trip(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, TOOL, "--model", "gpt2-small", "--rank-ratio", "0.25",
                           "--world", "8,64", "--json", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["summary"]["params_full"] == 124_439_808
    assert data["summary"]["params_low"] == _gpt2_small_low_params()
    assert set(data["worlds"]) == {"8", "64"}
    assert set(data["worlds"]["64"]) == {"ddp", "fsdp2", "zero1", "zero2", "zero3"}
    assert "### world 64" in proc.stdout
    ddp = data["worlds"]["64"]["ddp"]
    assert math.isclose(ddp["comm_full_bytes"], 2 * 63 / 64 * 4 * 124_439_808, rel_tol=1e-12)


def test_bad_plan_file_exits_2_naming_it(tool, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"h.0.attn.no_such_layer": 8}))
    assert tool.main(["--model", "gpt2-small", "--plan", str(plan)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(plan) in err and "no_such_layer" in err
    plan.write_text(json.dumps({"h.0.attn.c_attn": 769}))  # > min(2304, 768)
    assert tool.main(["--model", "gpt2-small", "--plan", str(plan)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(plan) in err
    assert tool.main(["--plan", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.json" in err
