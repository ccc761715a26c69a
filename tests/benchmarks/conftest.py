"""Benchmarks: pytest-benchmark, outside the default run except a smoke pass.

`pytest tests/benchmarks --benchmark-enable` measures; with ACN_BENCH_SMOKE=1 (set by the README's
test script, which also passes --benchmark-disable) each benchmark runs once at its smallest grid
point. scripts/bench_report.py turns a --benchmark-json file into the ratio tables of BENCHMARKS.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/testing.py

SMOKE = os.environ.get("ACN_BENCH_SMOKE", "0") == "1"


def grid(points: list, smoke: bool = SMOKE) -> list:
    """The grid, or only its first (smallest) point in smoke mode."""
    return points[:1] if smoke else points
