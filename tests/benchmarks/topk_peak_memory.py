"""Peak memory of one masked_topk call beyond its inputs, measured in a fresh process.

Usage: python tests/benchmarks/topk_peak_memory.py [--b 1024] [--n 1000000] [--d 64] [--k 10]
       [--backend cpu]
Prints one JSON line: {"B", "N", "D", "k", "backend", "bank_mb", "extra_peak_mb"}, where
extra_peak_mb is the resident-set high-water mark during the call minus the resident set just
before it (bank, queries and mask already allocated and touched). Linux only: the high-water
mark is reset through /proc/self/clear_refs.
"""

from __future__ import annotations

import argparse
import json


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(b: int, n: int, d: int, k: int, backend: str) -> dict:
    """Run one search of b queries against an n x d float32 bank (half of it masked)."""
    import torch

    import acn_kernels

    g = torch.Generator().manual_seed(0)
    bank = torch.randn(n, d, generator=g)
    queries = torch.randn(b, d, generator=g)
    mask = torch.rand(n, generator=g) < 0.5
    excl = torch.randint(-1, n, (b,), generator=g)
    # Small warm-up: loads the op and the BLAS library without touching the big arrays' peak.
    acn_kernels.masked_topk(queries[:2], bank[:100], 3, backend=backend)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = _status_kb("VmRSS")
    out = acn_kernels.masked_topk(queries, bank, k, exclude_mask=mask, exclude_index=excl, backend=backend)
    peak = _status_kb("VmHWM")
    assert out.indices.shape == (b, k)
    return {"B": b, "N": n, "D": d, "k": k, "backend": backend,
            "bank_mb": bank.numel() * 4 / 2**20, "extra_peak_mb": (peak - before) / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--b", type=int, default=1024)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--backend", default="cpu")
    a = p.parse_args()
    print(json.dumps(measure(a.b, a.n, a.d, a.k, a.backend)))


if __name__ == "__main__":
    main()
