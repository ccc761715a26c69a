"""Batch-order neighbour resolution: the fused op against the Python loop the bank ran before it
(the "torch" reference, acn_kernels.reference.resolve_neighbours: the lists read on the host,
one query at a time, the taken rows in a Python set).

Inputs as the bank makes them: masked_topk lists of B queries (bank rows) against a 60,000 x 16
bank with half its rows used, C = 2K entries (the default headroom K) or K + B - 1 (the
worst-case width, at most MAX_K); K = 5; uniforms float64 (acn_kernels.acn.rng.uniform).

Run: OMP_NUM_THREADS=1 pytest tests/benchmarks/bench_resolve_neighbours.py --benchmark-enable \\
         --benchmark-json=resolve.json
then: python scripts/bench_report.py resolve.json
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import grid

import acn_kernels
from acn_kernels import MAX_K
from acn_kernels.acn import rng
from acn_kernels.ops import resolve_neighbours

N, D, K = 60_000, 16, 5
# (B, C): the smoke point first; the goal is stated at B = 1024, C = 2K.
POINTS = grid([(128, 2 * K), (1024, 2 * K), (4096, 2 * K), (128, K + 127), (1024, MAX_K)])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def implementations() -> dict[str, str]:
    impls = {"python_loop": "torch"}
    av = acn_kernels.backends()
    if DEVICE == "cpu" and av["cpu"]:
        impls["acn_cpu"] = "cpu"
    if DEVICE == "cuda" and av["cuda"]:
        impls["acn_cuda"] = "cuda"
    return impls


IMPLS = implementations()


@functools.cache
def inputs(b: int, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(N, D, generator=g)
    index = torch.randperm(N, generator=g)[:b]
    used = torch.rand(N, generator=g) < 0.5
    used[index] = False
    cand = acn_kernels.masked_topk(bank[index], bank, c, exclude_mask=used, exclude_index=index).indices
    u = rng.uniform(0, rng.NEIGHBOUR, 0, index)
    return cand.to(DEVICE), index.to(DEVICE), u.to(DEVICE)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("point", POINTS, ids=lambda p: "B{}-C{}".format(*p))
def test_resolve_neighbours(benchmark, impl, point):
    b, c = point
    cand, index, u = inputs(b, c)
    backend = IMPLS[impl]
    benchmark.group = f"resolve_neighbours B={b} C={c} K={K} {DEVICE}"
    benchmark.extra_info.update(op="resolve_neighbours", B=b, C=c, K=K, impl=impl, device=DEVICE)

    def step():
        out = resolve_neighbours(cand, index, u, K, backend=backend)
        sync()
        return out

    want = resolve_neighbours(cand, index, u, K, backend="torch")
    got = benchmark(step)
    assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
