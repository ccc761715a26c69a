"""Benchmarks: pytest-benchmark, outside the default run except a smoke pass.

`pytest tests/benchmarks --benchmark-enable` measures; with ACN_BENCH_SMOKE=1 (set by the README's
test script, which also passes --benchmark-disable) each benchmark runs once at its smallest grid
point. scripts/bench_report.py turns --benchmark-json files into the ratio tables of BENCHMARKS.md.

The op benchmarks (bench_masked_topk.py, bench_mixture.py) run on :data:`DEVICE`: the GPU when
one is visible (scripts/gpu_check.sh bench), else the CPU; ACN_BENCH_DEVICE=cpu|cuda overrides.
They draw their inputs with the tests' factories (tests/testing.py) and list a CPU grid and a
GPU grid; the grid of the other device is collected and skipped with its reason
(:func:`device_marks`). The GPU grid (:func:`gpu_grid`; ACN_BENCH_GRID=fixed keeps the six fixed
points of scripts/gpu_check.sh) is timed with :func:`cuda_event_clock` (the ``benchmark``
marker's timer) and each result records its floor (:func:`floors`, :func:`record_floor`),
measured on the device at the start of the run.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/testing.py

SMOKE = os.environ.get("ACN_BENCH_SMOKE", "0") == "1"
DEVICE = os.environ.get("ACN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.startswith("cuda")
GRID = os.environ.get("ACN_BENCH_GRID", "full")
"""On a GPU: "full" (the issue's grid) or "fixed" (the six points of scripts/gpu_check.sh bench)."""


def grid(points: list, smoke: bool = SMOKE) -> list:
    """The grid, or only its first (smallest) point in smoke mode."""
    return points[:1] if smoke else points


def gpu_grid(points: list, fixed: list) -> list:
    """The GPU grid: ``fixed`` (points gpu_check times, a subset of the grid) first, then the rest
    of ``points``; only ``fixed`` with ACN_BENCH_GRID=fixed; in smoke mode the first (smallest)
    of ``points``."""
    if SMOKE:
        return points[:1]
    return list(fixed) if GRID == "fixed" else list(fixed) + [p for p in points if p not in fixed]


# ---------------------------------------------------------------------------------------------
# The GPU timer

_clock = {"last": None, "seconds": 0.0}


def cuda_event_clock() -> float:
    """Seconds on the GPU's timeline: records an event on the current stream, waits for it and
    adds its distance from the previous reading (float64 sums of short event intervals, so the
    clock keeps microsecond resolution over a long run). Two readings around a call time the
    work it queued, from the stream reaching the first event to the end of that work."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    event.synchronize()
    last = _clock["last"]
    if last is not None:
        _clock["seconds"] += last.elapsed_time(event) / 1e3
    _clock["last"] = event
    return _clock["seconds"]


def device_marks(device: str) -> list:
    """Marks of the op benchmarks' cases on ``device``: its timer (:func:`cuda_event_clock` on a
    GPU, time.perf_counter on CPU), and a skip with the reason where :data:`DEVICE` is another."""
    marks = [pytest.mark.benchmark(timer=cuda_event_clock if device == "cuda" else time.perf_counter)]
    if device == "cuda" and not GPU:
        why = "no CUDA device is visible" if not torch.cuda.is_available() else "ACN_BENCH_DEVICE=cpu"
        marks.append(pytest.mark.skip(reason=f"the GPU grid: {why}"))
    elif device == "cpu" and GPU:
        marks.append(pytest.mark.skip(reason="the CPU grid: this run times the GPU (ACN_BENCH_DEVICE=cpu for it)"))
    return marks


@contextlib.contextmanager
def matmul_tf32(enabled: bool) -> Iterator[None]:
    """float32 matrix products on the tensor cores in TF32 (``enabled``) or in full float32, the
    previous setting restored after."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):  # torch >= 2.9: the legacy flag must not be mixed with it
        prev = m.fp32_precision
        m.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            m.fp32_precision = prev
    else:
        prev = m.allow_tf32
        m.allow_tf32 = enabled
        try:
            yield
        finally:
            m.allow_tf32 = prev


# ---------------------------------------------------------------------------------------------
# Floors, measured on the device


def _median_seconds(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_floors(device: str = DEVICE) -> dict[str, float | str]:
    """The ceilings of this GPU, measured now on random data (never zeros): dense matrix-product
    rates in TFLOP/s (bf16, float32 as TF32, float32 in full precision: the SIMT FFMA rate, as
    cuBLAS runs it) and the device-to-device copy bandwidth in GB/s (bytes read + written)."""
    g = torch.Generator(device=device).manual_seed(0)
    out: dict[str, float | str] = {"device_name": torch.cuda.get_device_name(device)}
    for key, dtype, n, tf32 in (("bf16_tflops", torch.bfloat16, 8192, False),
                                ("tf32_tflops", torch.float32, 8192, True),
                                ("fp32_tflops", torch.float32, 4096, False)):
        a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        with matmul_tf32(tf32):
            out[key] = 2 * n**3 / _median_seconds(lambda a=a, b=b: a @ b, reps=10) / 1e12
        del a, b
    src = torch.randn(2**28, device=device, generator=g)  # 1 GiB, far above the L2
    dst = torch.empty_like(src)
    out["copy_gbs"] = 2 * src.numel() * 4 / _median_seconds(lambda: dst.copy_(src), reps=20) / 1e9
    return out


@pytest.fixture(scope="session")
def floors() -> dict[str, float | str] | None:
    """:func:`measure_floors` once per session on a GPU; None on CPU (no floors there)."""
    return measure_floors() if GPU and not SMOKE else None


def record_floor(benchmark, floors: dict | None, *, flops: float, nbytes: float, matmul: str | None) -> None:
    """Store in ``benchmark.extra_info`` the problem's floor: the larger of ``flops`` at the
    ``matmul`` rate ("bf16", "tf32", "fp32"; None: no matrix product) and ``nbytes`` (each input
    read once, each output written once) at the copy bandwidth; and the measured rates."""
    if floors is None:
        return
    compute = flops / (floors[f"{matmul}_tflops"] * 1e12) if matmul else 0.0
    memory = nbytes / (floors["copy_gbs"] * 1e9)
    benchmark.extra_info.update(floor_s=max(compute, memory),
                                floor=f"{matmul} matmul" if compute >= memory else "copy bandwidth",
                                flops=flops, bytes=nbytes, floors=floors)

