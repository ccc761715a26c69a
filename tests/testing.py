"""Helpers for the tests: which backends run here, the poison hook, tolerances."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch

import acn_kernels
from acn_kernels import _ext

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_GPU = torch.cuda.is_available()


def runnable_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs this process can run, the Triton interpreter excluded unless set."""
    av = acn_kernels.backends()
    pairs = [("torch", "cpu")]
    if av["cpu"]:
        pairs.append(("cpu", "cpu"))
    if HAS_GPU:
        pairs.append(("torch", "cuda"))
        if av["cuda"]:
            pairs.append(("cuda", "cuda"))
        if av["triton"]:
            pairs.append(("triton", "cuda"))
    elif INTERPRET and av["triton"]:
        pairs.append(("triton", "cpu"))
    return pairs


def backend_params(include_torch: bool = False) -> list:
    """pytest params over the compiled backends (and "torch" if asked) runnable here."""
    out = []
    for be, dev in runnable_backends():
        if be == "torch" and not include_torch:
            continue
        marks = [pytest.mark.triton] if be == "triton" else []
        out.append(pytest.param(be, dev, id=f"{be}-{dev}", marks=marks))
    return out


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Kernels allocate outputs filled with NaN / INT64_MIN, so an unwritten element fails a test."""
    from acn_kernels import _testing

    prev = _testing.POISON
    _testing.set_poison(True)
    try:
        yield
    finally:
        _testing.set_poison(prev)


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float64: dict(rtol=1e-9, atol=1e-9),
        torch.float32: dict(rtol=2e-4, atol=2e-4),
        torch.float16: dict(rtol=2e-2, atol=2e-2),
        torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
    }[dtype]


requires_ext = pytest.mark.skipif(_ext.C is None, reason=f"_C did not load: {_ext.LOAD_ERROR}")
