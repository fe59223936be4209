"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (IDX gz files, real train/test split)."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from dist_lowrank.errors import ConfigError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (magic 0x0000 08 NDIM, big-endian dims, uint8 payload)."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise ConfigError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ConfigError(f"{path}: payload has {data.size} bytes, header says {dims}")
    return data.reshape(dims)


def load_fashion_mnist(split: str, root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float (N, 1, 28, 28) normalized to zero mean / unit std, labels as int64 (N,)."""
    root_dir = Path(root or os.environ.get("FASHION_MNIST_DIR", DEFAULT_DIR))
    if split not in _FILES:
        raise ConfigError(f"data.split: got {split!r}; allowed: 'train', 'test'")
    img_file, lbl_file = (root_dir / f for f in _FILES[split])
    for f in (img_file, lbl_file):
        if not f.exists():
            raise ConfigError(f"{f}: missing; install it with `apt-get install dataset-fashion-mnist`")
    images = torch.from_numpy(read_idx(img_file).copy()).float().div_(255.0)
    labels = torch.from_numpy(read_idx(lbl_file).astype(np.int64))
    images = (images - 0.2860) / 0.3530  # Fashion-MNIST train-set mean / std
    return images.unsqueeze(1), labels
