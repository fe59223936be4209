"""Shared pieces of the Hugging Face examples: tiny GPT-2 / Llama from configs (random init, nothing
downloaded), Shakespeare character batches, and the `lowrank` section they use (default targets)."""
from __future__ import annotations

from functools import lru_cache
from typing import Iterator, Optional

import torch
from torch import nn

SEQ = 32          # tokens per sequence
BATCH = 8         # sequences per rank per step

# Default targets (every Linear / Conv1D); the tied lm_head is skipped by the plugin with the reason logged.
# Cuttlefish with min = max switch step: ranks from the measured stable ranks, at a known step.
def lowrank_section(switch_step: int = 10, strategy: str = "cuttlefish") -> dict:
    return {"strategy": strategy, "monitor": {"cadence_steps": 5},
            "cuttlefish": {"min_switch_step": switch_step, "max_switch_step": switch_step},
            "switch": {"profile_layers": False}}


@lru_cache(maxsize=1)
def _corpus() -> tuple[torch.Tensor, torch.Tensor, int]:
    from dist_lowrank.data.shakespeare import CharTokenizer, load_plays

    train, val = load_plays()
    tok = CharTokenizer(train + val)
    return tok.encode(train), tok.encode(val), tok.vocab_size


def vocab_size() -> int:
    return _corpus()[2]


def gpt2(seed: int = 0) -> nn.Module:
    """transformers' GPT2LMHeadModel (Conv1D layers, lm_head tied to wte), 2 layers, n_embd 64."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size(), n_positions=SEQ, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def llama(seed: int = 0) -> nn.Module:
    """transformers' LlamaForCausalLM (Linear projections, RMSNorm, rotary, grouped KV), head tied to the
    embedding, 2 layers, hidden 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def batches(rank: int = 0, world: int = 1, batch: int = BATCH, seed: int = 0,
            device: Optional[torch.device] = None) -> Iterator[torch.Tensor]:
    """Endless (batch × SEQ) token windows of the training plays; every step draws one global batch and
    rank r takes its slice, so a one-process run of batch·world sequences sees the same data."""
    tokens = _corpus()[0]
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - SEQ, (batch * world,), generator=gen)[rank * batch:(rank + 1) * batch]
        x = torch.stack([tokens[s:s + SEQ] for s in starts.tolist()])
        yield x if device is None else x.to(device)


def eval_batch(n: int = 4, device: Optional[torch.device] = None) -> torch.Tensor:
    """Fixed held-out windows (validation plays) to compare model outputs on."""
    tokens = _corpus()[1]
    x = torch.stack([tokens[i * 997:i * 997 + SEQ] for i in range(n)])
    return x if device is None else x.to(device)


def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (HF computes the shift when given labels)."""
    return model(input_ids=x, labels=x).loss


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits.float().cpu()
