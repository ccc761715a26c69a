"""Every kernel path of the compiled ops once, on small shapes, checked against the float64
reference: the program that scripts/gpu_check.sh runs under compute-sanitizer (memcheck,
racecheck, synccheck, initcheck), where a pytest run would be too slow.

    python tests/sanitize_driver.py [--device cuda]

Prints one MISMATCH line per failing case and "driver: N mismatches on DEVICE"; exits 1 if N > 0.
On CPU tensors it drives the "cpu" kernels (tests/test_scripts.py runs it that way).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator

import torch
from testing import (
    MIXTURE_KINDS,
    assert_topk_exact,
    check_mixture,
    check_topk,
    grid_data,
    mixture_inputs,
    ref_topk,
    run_topk,
)

DTYPES = (torch.float32, torch.float16, torch.float64)


def _topk_case(backend: str, device: str, dtype: torch.dtype, b: int, n: int, d: int, k: int) -> None:
    g = torch.Generator().manual_seed(n + k)
    q, bank = grid_data(b, d, seed=b, dtype=dtype), grid_data(n, d, seed=n, dtype=dtype)
    if d:
        bank[3, 0] = math.nan
        if b > 1:
            q[0, -1] = math.inf
    mask = torch.rand(n, generator=g) < 0.3
    excl = torch.randint(-1, n, (b,), generator=g)
    args = [t.to(device) for t in (q, bank, mask, excl)]
    got = run_topk(backend, args[0], args[1], k, args[2], args[3])
    check_topk(*got, q, bank, k, mask, excl)
    assert_topk_exact(got, ref_topk(q, bank, k, mask, excl))


def cases(device: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """(name, check) for every path: mixture D = 0 / 1 / 16 / 33, M = 1 to 5, with and without
    code, per dimension or summed; masked_topk one split, several splits and the merge kernel,
    k = MAX_K, D = 0 (all ties), a B that leaves the last query group partly empty, and the CUDA
    tensor-core path (B = 64, D = 33: plain copies, two flush groups)."""
    backend = "cuda" if device.startswith("cuda") else "cpu"
    for dtype in DTYPES:
        for b, d, m in [(5, 33, 3), (3, 1, 1), (2, 0, 2), (4, 16, 5)]:
            inputs = mixture_inputs(b, d, m, seed=b + d + m, dtype=dtype, device=device)
            for kind in MIXTURE_KINDS:
                yield (f"mixture {kind} {dtype} B={b} D={d} M={m}",
                       lambda kind=kind, inputs=inputs: check_mixture(kind, backend, inputs))
        for b, n, d, k in [(3, 700, 7, 5), (1, 3000, 16, 300), (9, 1100, 20, 1024), (4, 50, 0, 3),
                           (10, 5000, 5, 17), (64, 5000, 33, 40)]:  # the last: the tensor-core path (B >= 32)
            yield (f"masked_topk {dtype} B={b} N={n} D={d} k={k}",
                   lambda args=(dtype, b, n, d, k): _topk_case(backend, device, *args))


def driver(device: str = "cuda") -> int:
    """Runs every case; returns the number of mismatches (each printed)."""
    failures = 0
    for name, check in cases(device):
        try:
            check()
        except AssertionError as e:
            failures += 1
            print(f"MISMATCH {name}: {str(e).splitlines()[0][:300]}")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"driver: {failures} mismatches on {device}")
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    return 1 if driver(p.parse_args(argv).device) else 0


if __name__ == "__main__":
    sys.exit(main())
