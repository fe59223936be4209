"""save_lowrank / load_lowrank in one process: layout travels with the weights, ties load into every owner."""
from __future__ import annotations

import json

import pytest
import torch

import dist_lowrank
from dist_lowrank.errors import CheckpointError
from dist_lowrank.surgery import apply_rank_plan, clean_name

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def test_switched_model_round_trip(tmp_path):
    model = gpt2()
    apply_rank_plan(model, {"transformer.h.0.attn.c_attn": 4, "transformer.h.0.mlp.c_fc": 6})
    dist_lowrank.save_lowrank(model, tmp_path)
    assert json.loads((tmp_path / "layout.json").read_text()) == {
        "transformer.h.0.attn.c_attn": {"type": "lowrank", "rank": 4},
        "transformer.h.0.mlp.c_fc": {"type": "lowrank", "rank": 6}}
    loaded = dist_lowrank.load_lowrank(gpt2, tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=x).logits, model.eval()(input_ids=x).logits)  # eval: no dropout
    # a tie stored once: drop the alias and load again
    state = torch.load(tmp_path / "model_fp32.pt")
    state.pop("lm_head.weight")
    torch.save(state, tmp_path / "model_fp32.pt")
    again = dist_lowrank.load_lowrank(gpt2(), tmp_path)
    assert torch.equal(again.lm_head.weight, model.transformer.wte.weight)


def test_load_errors_name_the_file_and_tensor(tmp_path):
    with pytest.raises(CheckpointError, match=r"model_fp32.pt: missing \(write it with dist_lowrank.save_lowrank\)"):
        dist_lowrank.load_lowrank(gpt2, tmp_path)
    model = gpt2()
    dist_lowrank.save_lowrank(model, tmp_path)
    (tmp_path / "layout.json").write_text(json.dumps({"transformer.h.0.attn.c_attn": {"type": "lowrank", "rank": 3}}))
    with pytest.raises(CheckpointError, match=r"model_fp32.pt: transformer.h.0.attn.c_attn.bias is not in the model"):
        dist_lowrank.load_lowrank(gpt2, tmp_path)
    (tmp_path / "layout.json").write_text(json.dumps({"nope": {"type": "lowrank", "rank": 3}}))
    with pytest.raises(CheckpointError, match="layout.nope: the model has no such layer"):
        dist_lowrank.load_lowrank(gpt2, tmp_path)


def test_wrapper_prefixes_are_removed():
    assert clean_name("model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert clean_name("h.0._checkpoint_wrapped_module.") == "h.0"
    assert clean_name("plain.name") == "plain.name"


def test_a_missing_untied_tensor_is_named(tmp_path):
    dist_lowrank.save_lowrank(gpt2(), tmp_path)
    state = torch.load(tmp_path / "model_fp32.pt")
    state.pop("transformer.wpe.weight")
    torch.save(state, tmp_path / "model_fp32.pt")
    with pytest.raises(CheckpointError, match="no tensor for transformer.wpe.weight"):
        dist_lowrank.load_lowrank(gpt2, tmp_path)
