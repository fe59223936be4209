"""Session-wide runs shared by the checkpoint and fault tests (each CLI run costs seconds of 2 ranks)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from tests.distributed.ckpt_common import BACKENDS, EXPORT, cli


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> Callable[[str], Path]:
    """backend → out_dir of the uninterrupted 2-rank tiny-GPT run (checkpoints at 4, 8, 12; fp32 export),
    made on first use and shared; tests copy what they damage."""
    done: dict[str, Path] = {}

    def get(backend: str) -> Path:
        if backend not in done:
            out = tmp_path_factory.mktemp(f"full-{backend}")
            cli(out, BACKENDS[backend] + EXPORT)
            done[backend] = out
        return done[backend]
    return get
