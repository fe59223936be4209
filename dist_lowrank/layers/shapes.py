"""How a layer's weight is seen as an (m × n) matrix, and when factorizing it saves parameters."""
from __future__ import annotations

import torch
from torch import nn


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D (weight stored (in, out)), detected by name so transformers stays optional."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_factorizable(module: nn.Module) -> bool:
    """Linear, Conv2d with groups == 1 (a grouped conv's weight is not one matrix) and HF Conv1D."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def matrix_dims(module: nn.Module) -> tuple[int, int]:
    """(m, n) = (out, in·k·k) without touching the weight values (works under ZeRO-3 / FSDP2 too)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.out_channels, module.in_channels // module.groups * kh * kw
    if is_hf_conv1d(module):
        return module.nf, module.nx
    if isinstance(module, nn.Linear) or (isinstance(getattr(module, "in_features", None), int)
                                         and isinstance(getattr(module, "out_features", None), int)):
        return module.out_features, module.in_features
    raise TypeError(f"{type(module).__name__} is not a factorizable layer (Linear, Conv2d, Conv1D)")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The (out × in·k·k) matrix view of the layer's weight (a transpose view for HF Conv1D)."""
    w = module.weight
    if is_hf_conv1d(module):
        return w.T
    if isinstance(module, nn.Conv2d):
        return w.reshape(w.shape[0], -1)
    if isinstance(module, nn.Linear):
        return w
    raise TypeError(f"{type(module).__name__} is not a factorizable layer (Linear, Conv2d, Conv1D)")


def saves_parameters(m: int, n: int, r: int) -> bool:
    """r(m + n) < m·n, i.e. r < mn/(m+n): factorizing at rank r has fewer weights than the dense layer."""
    return r * (m + n) < m * n


def max_saving_rank(m: int, n: int) -> int:
    """Largest rank that still saves parameters (0 when none does)."""
    return max(0, (m * n - 1) // (m + n))
