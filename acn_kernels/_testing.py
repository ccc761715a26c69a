"""Test hooks (not public API). ``set_poison(True)`` makes every kernel (C++, CUDA, Triton)
allocate its outputs filled with NaN (floats) or INT64_MIN (integers) instead of uninitialised
memory, so that an output element a kernel forgot to write fails the comparison."""

from __future__ import annotations

import torch

from . import _ext

POISON = False


def set_poison(on: bool) -> None:
    global POISON
    POISON = bool(on)
    if _ext.C is not None:
        _ext.C.set_poison_outputs(POISON)


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a poisoned buffer under set_poison(True) (for the Triton launchers)."""
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)
