"""Benchmarks: pytest-benchmark, outside the default run except a smoke pass.

`pytest tests/benchmarks --benchmark-enable` measures; with ACN_BENCH_SMOKE=1 (set by the README's
test script, which also passes --benchmark-disable) each benchmark runs once at its smallest grid
point. scripts/bench_report.py turns a --benchmark-json file into the ratio tables of BENCHMARKS.md.

The op benchmarks (bench_masked_topk.py, bench_mixture.py) run on :data:`DEVICE`: the GPU when
one is visible (scripts/gpu_check.sh bench), else the CPU; ACN_BENCH_DEVICE=cpu|cuda overrides.
They draw their inputs with the tests' factories (tests/testing.py) and time functions wrapped
by :func:`synchronized`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/testing.py

SMOKE = os.environ.get("ACN_BENCH_SMOKE", "0") == "1"
DEVICE = os.environ.get("ACN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def grid(points: list, smoke: bool = SMOKE) -> list:
    """The grid, or only its first (smallest) point in smoke mode."""
    return points[:1] if smoke else points


def synchronized(fn: Callable[[], object], device: str = DEVICE) -> Callable[[], object]:
    """``fn`` followed, on a GPU, by torch.cuda.synchronize(), so that a wall-clock timer sees
    the kernels' work and not only their launch (the hook for a GPU timer)."""
    if not str(device).startswith("cuda"):
        return fn

    def timed():
        out = fn()
        torch.cuda.synchronize()
        return out

    return timed


@pytest.fixture
def device() -> str:
    """The device the op benchmarks run on (:data:`DEVICE`)."""
    return DEVICE
