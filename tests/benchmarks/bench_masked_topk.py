"""Masked top-K: the fused kernels against torch (addmm + masked_fill + topk, chunked over the
bank) on the same device; on CPU also faiss-cpu IndexFlatL2 with the mask as an IDSelectorBitmap,
and unmasked faiss-cpu (the speed ceiling: it does no mask work and always searches every row).
On a GPU (conftest.DEVICE) the fused backends are "cuda" and "triton".

Run: flock /tmp/acn_bench.lock pytest tests/benchmarks/bench_masked_topk.py --benchmark-enable \
         --benchmark-json=topk.json
then: python scripts/bench_report.py topk.json
extra_info of the acn_cpu rows holds cpu_per_wall (process CPU time / wall time over the timed
rounds: about 2 on two idle cores shows both are used). test_topk_peak_memory measures the peak
memory of B=1024 queries against a 1,000,000 x 64 float32 bank in its own process.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import DEVICE, SMOKE, grid, synchronized
from testing import topk_inputs

import acn_kernels

# (B, N, D, K, masked fraction). The first is the smoke point; the second and third are the
# headline cases of the goals (>= 3x and >= 2x faiss-cpu with the mask).
POINTS = grid([
    (64, 10_000, 16, 1, 0.0),
    (256, 60_000, 16, 5, 0.5),
    (1024, 65_536, 32, 10, 0.5),
    (256, 60_000, 16, 5, 0.0),
    (1024, 65_536, 32, 10, 0.0),
    (64, 1_000_000, 64, 10, 0.5),
    (1024, 100_000, 128, 133, 0.5),
    (128, 200_000, 32, 133, 0.0),
])
# acn_torch: the "torch" backend (acn_kernels.reference, the exact oracle and the automatic
# fallback without the extension), which must stay within 10x of acn_cpu (issue 16).
IMPLS = ["acn_cuda", "acn_triton", "torch"] if DEVICE == "cuda" else ["acn_cpu", "acn_torch", "torch",
                                                                      "faiss_masked", "faiss_unmasked"]
# The torch peer's distance block (B x chunk floats) stays under this many bytes.
TORCH_BLOCK_BYTES = 256 * 2**20


def torch_topk(queries, bank, k, mask):
    """What a user writes in torch: ||q||^2 + ||b||^2 - 2 q.b by addmm, masked_fill, topk; the
    bank in chunks so that the B x chunk block stays bounded, chunk results merged by topk."""
    qn = queries.square().sum(1, keepdim=True)
    step = max(k, TORCH_BLOCK_BYTES // (4 * queries.shape[0]))
    best_d = best_i = None
    for s in range(0, bank.shape[0], step):
        blk = bank[s:s + step]
        d = torch.addmm(qn + blk.square().sum(1), queries, blk.t(), alpha=-2.0)
        d = d.masked_fill(mask[s:s + step], math.inf)
        kk = min(k, blk.shape[0])
        cd, ci = torch.topk(d, kk, dim=1, largest=False)
        ci = ci + s
        if best_d is not None:
            cd, ci = torch.cat([best_d, cd], 1), torch.cat([best_i, ci], 1)
            cd, o = torch.topk(cd, k, dim=1, largest=False)
            ci = ci.gather(1, o)
        best_d, best_i = cd, ci
    return best_d.clamp_min_(0), best_i


def make(impl, b, n, d, k, frac):
    """The timed function of ``impl`` on one problem (inputs on DEVICE)."""
    queries, bank, mask, _ = topk_inputs(b, n, d, seed=0, masked=frac, device=DEVICE)
    if mask is None:
        mask = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    if impl.startswith("acn_"):
        backend = impl.removeprefix("acn_")
        if not acn_kernels.backends()[backend]:
            pytest.skip(f"the {backend} backend cannot run here")
        return lambda: acn_kernels.masked_topk(queries, bank, k, exclude_mask=mask, backend=backend)
    if impl == "torch":
        return lambda: torch_topk(queries, bank, k, mask)
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexFlatL2(d)
    index.add(bank.numpy())
    qn = queries.numpy()
    if impl == "faiss_unmasked":
        return lambda: index.search(qn, k)
    bits = np.packbits((~mask).numpy(), bitorder="little")  # a set bit selects a row
    sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
    params = faiss.SearchParameters(sel=sel)
    return lambda: (index.search(qn, k, params=params), bits)  # keep the bitmap alive


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("point", POINTS, ids=lambda p: "B{}-N{}-D{}-K{}-m{}".format(*p))
def test_masked_topk(benchmark, device, impl, point):
    b, n, d, k, frac = point
    fn = synchronized(make(impl, b, n, d, k, frac), device)
    benchmark.group = f"masked_topk B={b} N={n} D={d} K={k} masked={frac:.0%} {device}"
    benchmark.extra_info.update(op="masked_topk", B=b, N=n, D=d, K=k, masked=frac, impl=impl,
                                device=device, threads=torch.get_num_threads())
    fn()  # warm-up (and the Triton kernels' compilation)
    rounds = 1 if SMOKE else 5
    c0, t0 = _cpu_seconds(), time.perf_counter()
    benchmark.pedantic(fn, rounds=rounds, iterations=1)
    c1, t1 = _cpu_seconds(), time.perf_counter()
    benchmark.extra_info["cpu_per_wall"] = round((c1 - c0) / (t1 - t0), 2)


def test_topk_peak_memory(benchmark):
    """Peak extra memory (CPU) of B=1024 queries vs a 1,000,000 x 64 float32 bank (goal: < 300 MB),
    in a fresh process; the smoke pass uses a 100,000-row bank."""
    if not acn_kernels.backends()["cpu"]:
        pytest.skip("extension not built")
    n = 100_000 if SMOKE else 1_000_000
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "topk_peak_memory.py")
    out = subprocess.run([sys.executable, script, "--b", "1024", "--n", str(n), "--d", "64"],
                         check=True, capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    benchmark.group = "masked_topk peak memory"
    benchmark.extra_info.update(impl="acn_cpu", **res)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\nmasked_topk peak extra memory: {res['extra_peak_mb']:.1f} MB "
          f"(bank {res['bank_mb']:.0f} MB, B=1024, N={n}, D=64)")
