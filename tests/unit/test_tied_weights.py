"""Tied and shared weights are detected by identity and never factorized apart (item 5 of issue 13)."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from dist_lowrank.reshape.builders import switch_change
from dist_lowrank.errors import ConfigError
from dist_lowrank.targeting import select_targets, tied_layers

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


def gpt2(tie: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                      tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0))


def test_default_targets_skip_the_tied_head_with_the_reason_logged(caplog):
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    with caplog.at_level(logging.INFO, logger="dist_lowrank"):
        targets = select_targets(model, ".*")
    assert "lm_head" not in targets and "transformer.h.0.attn.c_attn" in targets and len(targets) == 4
    assert "lm_head: kept dense: tied weights (lm_head.weight is transformer.wte.weight)" in caplog.text
    assert "lm_head" in select_targets(gpt2(tie=False), ".*")  # untied: an ordinary target


@pytest.mark.parametrize("targets", [["lm_head"], ["c_attn", "lm_head"], "lm_head"])
def test_naming_a_tied_layer_is_one_clear_error(targets):
    with pytest.raises(ConfigError) as info:
        select_targets(gpt2(), targets)
    message = str(info.value)
    assert "\n" not in message and message.startswith("lowrank.target_modules: 'lm_head' names lm_head")
    assert "tied to another module (lm_head.weight is transformer.wte.weight)" in message
    assert select_targets(gpt2(), ["lm_head", "c_fc"], exclude_modules=["lm_head"])  # excluded: no error


class Shared(nn.Module):
    """One Parameter on two Linear layers, and one module reachable under two names."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.free = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.x = nn.Linear(8, 8)
        self.y = self.x


def test_any_shared_parameter_or_module_is_a_tie():
    model = Shared()
    ties = tied_layers(model)
    assert ties == {"a": "a.weight is b.weight", "b": "b.weight is a.weight",
                    "x": "the same module is also reachable as y"}
    assert list(select_targets(model, ".*")) == ["free"]
    with pytest.raises(ConfigError, match=r"'x' names x, which is tied to another module \(the same module is also"):
        select_targets(model, ["x"])
    with pytest.raises(ConfigError, match=r"'b' names b, .*\(b.weight is a.weight\)"):
        select_targets(model, ["free", "b"])


def test_attach_with_default_targets_on_a_tied_hf_model():
    """The path that ended in a bare KeyError 'lm_head.weight' (the monitor reads every target's weight)."""
    from dist_lowrank import attach
    from dist_lowrank.backends.local_backend import LocalBackend

    model = gpt2()
    backend = LocalBackend(model, lambda p: torch.optim.AdamW(p, lr=1e-3))
    controller = attach(backend, {"strategy": "fixed", "fixed": {"warmup_steps": 1, "ratio": 0.25},
                                  "switch": {"profile_layers": False}, "monitor": {"cadence_steps": 1}})
    assert "lm_head" not in controller.names and len(controller.names) == 4
    loss = model(input_ids=torch.arange(16).reshape(2, 8), labels=torch.arange(16).reshape(2, 8)).loss
    backend.backward(loss)
    backend.step()
    plan = controller.after_step(1, float(loss))
    assert plan is not None and set(plan.ranks) == set(controller.names) - {"lm_head"}
    assert model.lm_head.weight is model.transformer.wte.weight


def test_inrank_conversion_leaves_the_tied_head_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    from dist_lowrank.config import load_config
    from dist_lowrank.methods.inrank.model import inrank_layers, to_inrank

    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                         bos_token_id=0, eos_token_id=0, pad_token_id=0))
    to_inrank(model, load_config({"strategy": "inrank", "inrank": {"init_rank": 2}}))
    assert "lm_head" not in inrank_layers(model) and len(inrank_layers(model)) == 7
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_the_tie_holds_after_a_resume_past_the_switch(tmp_path):
    """RELIABILITY 20: a switched model rebuilt from the saved layout and loaded back keeps the head tied, and
    training continues as the uninterrupted run does (same losses, bit for bit: one process, same state)."""
    from dist_lowrank.backends.local_backend import LocalBackend
    from dist_lowrank.checkpoint.manifest import apply_layout, layout_of
    ids = torch.arange(32).reshape(4, 8) % 50

    def run(resume: bool) -> list[float]:
        model = gpt2()
        backend = LocalBackend(model, lambda p: torch.optim.AdamW(p, lr=1e-2))
        losses = []
        for step in range(1, 7):
            loss = backend.model(input_ids=ids, labels=ids).loss
            backend.backward(loss)
            backend.step()
            losses.append(float(loss.detach()))
            if step == 2:
                backend.apply(switch_change(backend.unwrapped_model(), {"transformer.h.0.attn.c_attn": 4, "transformer.h.0.mlp.c_fc": 4}, 2))
            if step == 4 and resume:
                layout, meta = layout_of(backend.module), backend.engine_meta()
                backend.save_state(tmp_path, "{}")
                rng = torch.get_rng_state()  # gpt2() seeds; the dropout masks of later steps must not change
                fresh = apply_layout(gpt2(), layout)
                torch.set_rng_state(rng)
                backend = LocalBackend(fresh, lambda p: torch.optim.AdamW(p, lr=1e-2), param_groups=meta["param_groups"])
                backend.load_state(tmp_path, meta)
        module = backend.module
        assert module.lm_head.weight is module.transformer.wte.weight
        assert type(module.transformer.h[0].attn.c_attn).__name__ != "Conv1D"  # the resumed model is the switched one
        return losses

    assert run(resume=True) == run(resume=False)
