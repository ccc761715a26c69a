"""Internals of the "cpu" backend (csrc/cpu): each op's baseline, AVX2 and AVX-512 variants
(picked at run time; ACN_CPU_ISA=base|avx2 caps the choice) give the reference's results, each
in a fresh process. The contracts of both ops are tested once in test_masked_topk.py and
test_mixture.py (including the kernels' paths: direct and GEMM, bank chunks and their merge,
the heap at k = MAX_K, transposed mixture blocks and component chunks)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from testing import requires_ext

_MASKED_TOPK = """
import math, torch, acn_kernels
from testing import assert_topk_exact, grid_data, ref_topk
g = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.float64, torch.bfloat16):
    for b, n, d, k in ((3, 5000, 7, 9), (40, 3000, 33, 50)):
        q, bank = grid_data(b, d, seed=b, dtype=dt), grid_data(n, d, seed=n, dtype=dt)
        bank[5, 0] = math.nan
        mask = torch.rand(n, generator=g) < 0.3
        excl = torch.randint(-1, n, (b,), generator=g)
        got = acn_kernels.masked_topk(q, bank, k, exclude_mask=mask, exclude_index=excl, backend="cpu")
        assert_topk_exact(got, ref_topk(q, bank, k, mask, excl))
print("ok")
"""

_MIXTURE = """
import torch
from testing import MIXTURE_KINDS, check_mixture, mixture_inputs
for dt in (torch.float32, torch.float64, torch.bfloat16):
    for b, d, m in ((5, 16, 3), (7, 37, 12), (3, 33, 17)):
        for kind in MIXTURE_KINDS:
            check_mixture(kind, "cpu", mixture_inputs(b, d, m, seed=m, dtype=dt))
print("ok")
"""


@requires_ext
@pytest.mark.parametrize("isa", ["base", "avx2"])
@pytest.mark.parametrize("op", ["masked_topk", "mixture"])
def test_isa_variants(isa, op):
    """The capped variants (the machine's best one runs in every other test): both masked_topk
    paths (direct B <= 8, GEMM beyond), the mixture's full and partial lane blocks."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ACN_CPU_ISA=isa, PYTHONPATH=os.pathsep.join(
        [tests, *filter(None, [os.environ.get("PYTHONPATH")])]))
    script = _MASKED_TOPK if op == "masked_topk" else _MIXTURE
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
