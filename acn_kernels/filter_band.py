"""The error band of the masked top-K distance filter (docs/filter-band.md), in Python.

The same function as ``acn::filter_band`` in csrc/include/filter_band.h, written with the same
double-precision operations in the same order, so both give bit-identical constants
(tests/test_filter_band.py compares them on a table of cases).

A kernel filters a pair (query q, bank row b) with the expanded form of the squared distance,

    F = nx + ny - 2 g,   nx = |x|^2, ny = |y|^2, g = <x~, y~> on the matrix unit,

where x = fl(q - c), y = fl(b - c) are the inputs after an optional shift c (``centred``), x~, y~
the matrix unit's operands (rounded as ``inputs`` says) and nx, ny, l1x = |x|_1, l1y = |y|_1 are
computed in the accumulation type. The pair is rejected only when

    F > tau + alpha * tau + beta * (nx + ny) + eta * (l1x + l1y) + abs,

where tau is the current k-th reported (direct-form) distance. The band guarantees that a pair
whose reported distance is <= tau is never rejected, so the survivors, rescored in the direct
form, give exactly the direct-form selection.
"""

from __future__ import annotations

import math
from typing import NamedTuple

# How the matrix unit sees its operands: (relative rounding u_in, absolute rounding eta_in,
# products per term, whether the accumulator rounds like the tensor cores (any faithful rounding,
# so up to one ulp) rather than to nearest). See docs/filter-band.md, "Operand models".
INPUTS: dict[str, tuple[float, float, int, bool]] = {
    # fp32 (or fp64) operands, as a CPU GEMM multiplies them: no operand rounding.
    "exact": (0.0, 0.0, 1, False),
    # TF32: 10 explicit mantissa bits; truncation (2^-10) covers round-to-nearest (2^-11);
    # subnormal operands may be flushed (2^-126).
    "tf32": (2.0**-10, 2.0**-126, 1, True),
    # 3xTF32 (big*big + big*small + small*big): per product error 3 * 2^-20 <= 2 u_in + u_in^2.
    "tf32x3": (2.0**-19, 2.0**-125, 3, True),
    # bfloat16 operands, rounded to nearest (8 significant bits).
    "bf16": (2.0**-8, 2.0**-126, 1, True),
    # An exact-ish bf16 split (hi*hi + hi*lo + lo*hi): per product error 3 * 2^-16.
    "bf16x3": (2.0**-15, 2.0**-125, 3, True),
    # float16 operands, rounded to nearest (11 significant bits); subnormals may be flushed
    # (2^-14, the smallest normal). Only for operands of magnitude <= FP16_MAX.
    "fp16": (2.0**-11, 2.0**-14, 1, True),
}

FP16_MAX = 65504.0
"""Operands above this magnitude overflow float16: such a row must not be filtered."""

UNIT_FP32 = 2.0**-24
TINY_FP32 = 2.0**-126
UNIT_FP64 = 2.0**-53
TINY_FP64 = 2.0**-1022


class FilterBand(NamedTuple):
    """Coefficients of the band: alpha * tau + beta * (nx + ny) + eta * (l1x + l1y) + abs."""

    alpha: float
    beta: float
    eta: float
    abs: float


def _gamma(n: float, v: float) -> float:
    """gamma_n = n v / (1 - n v), the classical bound on n roundings of relative size v; +inf
    where n v >= 1/2 (the bound is then useless and the filter must reject nothing)."""
    nv = n * v
    return nv / (1.0 - nv) if nv < 0.5 else math.inf


def filter_band(d: int, inputs: str, centred: bool, unit: float = UNIT_FP32, tiny: float = TINY_FP32) -> FilterBand:
    """Band coefficients for dimension ``d``.

    Args:
        d: the dimension D (>= 0).
        inputs: how the matrix unit rounds its operands, a key of :data:`INPUTS`.
        centred: whether the operands are fl(q - c), fl(b - c) for a shared shift c (adds the
            rounding of the two subtractions) rather than q and b themselves.
        unit: unit roundoff of the accumulation type (2^-24 for float32, 2^-53 for float64).
        tiny: its smallest normal number.

    Returns:
        The coefficients, as doubles; a consumer rounding them to float32 stays inside the margin.
    """
    if d < 0:
        raise ValueError(f"d must be >= 0, got {d}")
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {sorted(INPUTS)}, got {inputs!r}")
    u_in, eta_in, terms, faithful = INPUTS[inputs]
    u = unit
    u_acc = 2.0 * u if faithful else u
    g_norm = _gamma(d, u)  # nx, ny, l1x, l1y: D products and D - 1 additions, any order
    g_dir = _gamma(d + 2, u)  # the reported distance: a subtraction, a square, D - 1 additions
    g_acc = _gamma(2.0 * terms * d + 2.0, u_acc)  # the matrix unit's accumulator, blocks included
    if math.isinf(g_norm) or math.isinf(g_dir) or math.isinf(g_acc):
        return FilterBand(math.inf, math.inf, math.inf, math.inf)
    rho = (1.0 + u_in) * (1.0 + u_in) * (1.0 + 2.0**-6)  # sum of |operand products| over |x||y|
    c_s = g_norm + (2.0 * u_in + u_in * u_in) + g_acc * rho
    if centred:
        c_s += (4.0 * u + 2.0 * u * u) / ((1.0 - u) * (1.0 - u))
    c_l = 2.0 * (1.0 + g_acc) * (1.0 + u_in) * eta_in
    c_0 = 2.0 * (1.0 + g_acc) * d * eta_in * eta_in
    alpha = 2.0 * (1.0 / (1.0 - g_dir) - 1.0) + 16.0 * u
    beta = 2.0 * c_s / (1.0 - g_norm) + 32.0 * u
    eta = 2.0 * c_l / (1.0 - g_norm)
    abs_ = 2.0 * (c_0 + (d + 8) * tiny)
    return FilterBand(alpha, beta, eta, abs_)
