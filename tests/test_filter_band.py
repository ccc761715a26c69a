"""The error band of the masked top-K distance filter (docs/filter-band.md, issue 10).

1. The C++ (csrc/include/filter_band.h) and Python (acn_kernels/filter_band.py) implementations
   give bit-identical constants on a table of cases (a small program compiled with the system
   C++ compiler prints the C++ side).
2. The band holds against the reduced-precision products the GPU computes, emulated on the CPU:
   operands rounded as the tensor cores take them (TF32 truncation, bf16 / fp16 to nearest with
   flushed subnormals), exact products, a float32 accumulator that rounds each block addition
   toward -inf (the direction that makes the filter reject) or to nearest, and the Triton
   kernel's evaluation of the test in float32. The data are built to sit on the band's edge:
   near-duplicate rows whose operands all lose the most the rounding can take, in the same
   direction. No true neighbour is ever rejected, the data use a good part of the band, and a
   band of a third the size would reject true neighbours (so the test can fail).
"""

from __future__ import annotations

import math
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from acn_kernels import filter_band as fb

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# 1. C++ and Python agree

_INPUT_ORDER = ["exact", "tf32", "tf32x3", "bf16", "bf16x3", "fp16"]  # the enum's order
CASES = [
    (d, inputs, centred, acc)
    for d in (0, 1, 3, 8, 16, 64, 100, 1000, 4096, 1 << 20, 1 << 22)
    for inputs in _INPUT_ORDER
    for centred in (False, True)
    for acc in ("fp32", "fp64")
]

_PROGRAM = r"""
#include <cstdint>
#include <cstdio>
#include <cstring>
#include "filter_band.h"

static unsigned long long bits(double v) { unsigned long long b; std::memcpy(&b, &v, 8); return b; }

int main() {
  long long d; int inputs, centred, fp64;
  while (std::scanf("%lld %d %d %d", &d, &inputs, &centred, &fp64) == 4) {
    const auto in = static_cast<acn::FilterInputs>(inputs);
    const acn::FilterBand b = fp64 ? acn::filter_band_for<double>(d, in, centred != 0)
                                   : acn::filter_band_for<float>(d, in, centred != 0);
    std::printf("%llu %llu %llu %llu\n", bits(b.alpha), bits(b.beta), bits(b.eta), bits(b.abs));
  }
  return 0;
}
"""


def _bits(v: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", v))[0]


def test_cpp_and_python_bands_are_bit_identical(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "band.cpp"
    src.write_text(_PROGRAM)
    exe = tmp_path / "band"
    subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", f"-I{ROOT / 'csrc' / 'include'}", str(src),
                    "-o", str(exe)], check=True, capture_output=True, timeout=120)
    stdin = "".join(f"{d} {_INPUT_ORDER.index(i)} {int(c)} {int(a == 'fp64')}\n" for d, i, c, a in CASES)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True, timeout=60).stdout
    rows = out.splitlines()
    assert len(rows) == len(CASES)
    for (d, inputs, centred, acc), row in zip(CASES, rows, strict=True):
        unit, tiny = (fb.UNIT_FP64, fb.TINY_FP64) if acc == "fp64" else (fb.UNIT_FP32, fb.TINY_FP32)
        want = [_bits(v) for v in fb.filter_band(d, inputs, centred, unit, tiny)]
        assert [int(x) for x in row.split()] == want, (d, inputs, centred, acc)


def test_band_properties():
    """Finite and positive where the bound applies, +inf where it does not (n u >= 1/2), wider
    for coarser operands and with centring, and the documented sizes (docs/filter-band.md)."""
    for d, inputs, centred, acc in CASES:
        unit, tiny = (fb.UNIT_FP64, fb.TINY_FP64) if acc == "fp64" else (fb.UNIT_FP32, fb.TINY_FP32)
        b = fb.filter_band(d, inputs, centred, unit, tiny)
        _, _, terms, faithful = fb.INPUTS[inputs]
        if (2 * terms * d + 2) * unit * (2 if faithful else 1) >= 0.5:  # the accumulator's gamma
            assert all(math.isinf(v) for v in b)
        else:
            assert all(math.isfinite(v) and v > 0 for v in (b.alpha, b.beta, b.abs))
            assert b.eta >= 0 and (b.eta == 0) == (inputs == "exact")
    order = [fb.filter_band(64, i, True).beta for i in ("exact", "tf32x3", "bf16x3", "tf32", "bf16")]
    assert order == sorted(order)
    assert fb.filter_band(64, "exact", True).beta > fb.filter_band(64, "exact", False).beta
    assert fb.filter_band(64, "exact", False).beta < 2.6e-5 and fb.filter_band(64, "exact", False).alpha < 9e-6
    assert 3.8e-3 < fb.filter_band(64, "tf32", True).beta < 4e-3
    with pytest.raises(ValueError, match="inputs"):
        fb.filter_band(4, "fp8", True)
    with pytest.raises(ValueError, match="d must be"):
        fb.filter_band(-1, "tf32", True)


# ---------------------------------------------------------------------------------------------
# 2. The band against emulated tensor-core products


def _round_operand(x: torch.Tensor, inputs: str) -> torch.Tensor:
    """float32 values as the matrix unit takes them (the Triton kernel's _operand, plus the
    subnormal flush the band allows)."""
    if inputs == "tf32":
        r = (x.view(torch.int32) & -8192).view(torch.float32)
        return torch.where(r.abs() < fb.TINY_FP32, 0.0, r)
    if inputs == "bf16":
        r = x.to(torch.bfloat16).float()
        return torch.where(r.abs() < fb.TINY_FP32, 0.0, r)
    r = x.half().float()
    return torch.where(r.abs() < 2.0**-14, 0.0, r)


def _round_f32(s: torch.Tensor, mode: str) -> torch.Tensor:
    """float64 values to float32 (as float64): to nearest, or toward -inf."""
    f = s.float()
    if mode == "down":
        f = torch.where(f.double() > s, torch.nextafter(f, torch.tensor(-math.inf)), f)
    return f.double()


def _mma(x: torch.Tensor, y: torch.Tensor, block: int, mode: str) -> torch.Tensor:
    """[B, D] @ [N, D]^T as a tensor core computes it: exact products (at most 11 + 11 bits), a
    float32 accumulator updated once per block of ``block`` products and rounded by ``mode``."""
    p = x.double()[:, None, :] * y.double()[None, :, :]
    acc = torch.zeros(p.shape[:2], dtype=torch.float64)
    for d0 in range(0, p.shape[2], block):
        acc = _round_f32(acc + p[:, :, d0:d0 + block].sum(-1), mode)
    return acc.float()


def _filter_slack(q, b, c, tau, inputs, mode, scale=1.0):
    """[B, N] slack of the Triton kernel's test ``g - h_b < lim_q`` (a pair is rejected where the
    slack is negative) in float32, and the part of it the band provides (the band times
    ``scale``, in the same units)."""
    d = q.shape[1]
    band = fb.filter_band(d, inputs, centred=True)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731 (kernel scalars are float32)
    alpha, beta, eta, gamma0 = (f32(v * scale) for v in band)
    x, y = q - c, b - c
    g = _mma(_round_operand(x, inputs), _round_operand(y, inputs), 8 if inputs == "tf32" else 16, mode)
    nx, ny = (x * x).sum(1), (y * y).sum(1)
    l1x, l1y = x.abs().sum(1), y.abs().sum(1)
    h = (ny * (f32(1.0) - beta) - eta * l1y) * 0.5
    lim = -(tau * (f32(1.0) + alpha) + (beta - f32(1.0)) * nx + eta * l1x + gamma0) * 0.5
    slack = (g - h[None, :]) - lim[:, None]
    width = (band.alpha * tau.double()[:, None] + band.beta * (nx.double()[:, None] + ny.double()[None, :])
             + band.eta * (l1x.double()[:, None] + l1y.double()[None, :]) + band.abs) * scale / 2
    return slack.double(), width


def _edge_data(inputs: str, b: int, n: int, d: int, seed: int):
    """Queries and near-duplicate rows (one block of n per query) whose shifted components all
    lose nearly the most their rounding can take, in the same direction, for every row: the
    components are in [2, 3) (or (-3, -2]) with the bits below the operand's precision set to
    just under the rounding point, and the rows differ from their query by whole operand ulps
    (which keeps those bits). The shift c = 1 keeps q = c + x exact."""
    g = torch.Generator().manual_seed(seed)
    keep, low = {"tf32": (13, 0x1FFF), "bf16": (16, 0x7FFF), "fp16": (13, 0x0FFF)}[inputs]
    # mantissas: a few random high bits (away from the ends of [2, 3)), the low bits set
    hi = torch.randint(1 << (22 - keep - 2), 1 << (22 - keep - 1), (b, d), generator=g, dtype=torch.int32)
    bits = torch.tensor(0x40000000, dtype=torch.int32) | (hi << keep) | low
    sign = torch.where(torch.rand(b, d, generator=g) < 0.5, -1.0, 1.0)
    x = bits.view(torch.float32) * sign
    ulp = 2.0 ** (1 - (23 - keep))  # the operand's ulp in [2, 4)
    steps = torch.randint(-1, 2, (b, n, d), generator=g).double()
    y = (x[:, None, :].double() + steps * ulp * sign[:, None, :]).float()
    c = torch.ones(d)
    if inputs == "fp16":
        # a few components below fp16's normal range, which a unit may flush (eta's term)
        x[:, :2] = sign[:, :2] * 2.0**-15 * 1.5
        y[:, :, :2] = x[:, None, :2]
        c[:2] = 0.0
    q = c + x
    bank = (c + y).reshape(b * n, d)
    return q, bank, c


@pytest.mark.parametrize("inputs", ["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("mode", ["down", "nearest"])
def test_band_holds_on_its_edge(inputs, mode):
    b, n, d = 6, 40, 64
    q, bank, c = _edge_data(inputs, b, n, d, seed=len(inputs) + len(mode))
    # The reported distance of each pair (direct form in float32) and each query's k-th
    # distance over its own block of rows (k = n: every row is a true neighbour).
    e = ((q[:, None, :] - bank[None, :, :]) ** 2).sum(-1)
    own = torch.arange(b * n).reshape(b, n)
    tau = torch.stack([e[i, own[i]].max() for i in range(b)])
    slack, width = _filter_slack(q, bank, c, tau, inputs, mode)
    mine = torch.zeros(b, b * n, dtype=torch.bool)
    for i in range(b):
        mine[i, own[i]] = True
    neighbours = mine & (e <= tau[:, None])
    assert neighbours.sum() == b * n
    assert (slack[neighbours] >= 0).all(), "the filter rejected a true neighbour"
    # The data sit on the edge: the rounding takes a good part of the band ...
    used = (1 - slack / width)[neighbours]
    assert used.max() > 0.35, used.max()
    # ... and a third of the band would reject true neighbours.
    slack3, _ = _filter_slack(q, bank, c, tau, inputs, mode, scale=1 / 3)
    assert (slack3[neighbours] < 0).any()


@pytest.mark.parametrize("inputs", ["tf32", "bf16", "fp16"])
def test_band_holds_on_random_offset_data(inputs):
    """Data far from the origin (offset 1000, spread 1): every row within the k-th reported
    distance of its query survives the emulated filter."""
    g = torch.Generator().manual_seed(3)
    b, n, d, k = 8, 500, 24, 10
    q = 1000 + torch.randn(b, d, generator=g)
    bank = 1000 + torch.randn(n, d, generator=g)
    bank[::7] = q[torch.arange(0, n, 7) % b] + 1e-3 * torch.randn(len(range(0, n, 7)), d, generator=g)
    c = torch.cat([q, bank]).double().mean(0).float()
    e = ((q[:, None, :] - bank[None, :, :]) ** 2).sum(-1)
    tau = e.sort(1).values[:, k - 1]
    for mode in ("down", "nearest"):
        slack, _ = _filter_slack(q, bank, c, tau, inputs, mode)
        assert (slack[e <= tau[:, None]] >= 0).all()
