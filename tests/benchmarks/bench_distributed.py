"""The sharded code bank's search on 2 Gloo processes against one process, on this machine's CPUs.

Per global batch of B queries (code size D, K = 5), two operations:

- "search": the side-effect-free K-NN search of the whole bank (DistributedCodeBank.search:
  all-gather of the queries, masked_topk over each shard, all-gather and merge of the lists);
- "neighbours": the training step's bank work (DistributedCodeBank.neighbours: code write,
  searches with the used mask, batch-order resolution, the picked codes' all-reduce), over
  successive batches of a pass.

Configurations, each in fresh processes: one process with a plain CodeBank on 1 thread and on 2
threads (the machine's cores), and 2 ranks x 1 thread with DistributedCodeBank over Gloo. Rank 0
times each call after a barrier (medians of ROUNDS calls); on 2 ranks also each rank's
masked_topk over its shard alone ("shard search alone": the part that is not communication).
pytest-benchmark cannot time work spread over processes, so this file prints a table (and
writes it as JSON to $ACN_BENCH_DIST_JSON if set) instead of using the benchmark fixture.

Run: OMP_NUM_THREADS=1 flock /tmp/acn_bench.lock pytest tests/benchmarks/bench_distributed.py -s
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
from conftest import SMOKE, grid

# (N, B, D): the smoke point first.
POINTS = grid([(4_000, 32, 16), (200_000, 128, 16), (1_000_000, 128, 16)])
CONFIGS = [(1, 1), (1, 2), (2, 1)]  # (processes, threads each)
K = 5
ROUNDS = 2 if SMOKE else 15
HARD_LIMIT_S = 900


def _launch(world: int, threads: int, point: tuple[int, int, int], folder) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [str(world), str(threads), *map(str, point), str(folder)]
    procs = [subprocess.Popen([sys.executable, __file__, str(r), *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    try:
        outs = [p.communicate(timeout=HARD_LIMIT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return json.loads(outs[0][0].strip().splitlines()[-1])


@pytest.mark.parametrize("point", POINTS, ids=lambda p: "N{}-B{}-D{}".format(*p))
def test_distributed_search(point, tmp_path):
    results = {f"{w}x{t}": _launch(w, t, point, tmp_path) for w, t in CONFIGS}
    n, b, d = point
    print(f"\nN={n} B={b} D={d} K={K}, median ms of {ROUNDS} (processes x threads):")
    for name, r in results.items():
        shard = f", shard search alone {1e3 * r['shard_search']:.2f} ms" if "shard_search" in r else ""
        print(f"  {name}: search {1e3 * r['search']:.2f} ms, neighbours {1e3 * r['neighbours']:.2f} ms{shard}")
    if os.environ.get("ACN_BENCH_DIST_JSON"):
        with open(os.environ["ACN_BENCH_DIST_JSON"], "a") as f:
            f.write(json.dumps({"N": n, "B": b, "D": d, "K": K, "rounds": ROUNDS, **results}) + "\n")
    assert all(r["search"] > 0 and r["neighbours"] > 0 for r in results.values())


def _measure(rank: int, world: int, threads: int, n: int, b: int, d: int, folder: str) -> None:
    import torch.distributed as dist

    from acn_kernels import CodeBank, masked_topk
    from acn_kernels.acn.distributed import DistributedCodeBank, PassSampler

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous-{world}x{threads}-{n}",
                                rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
        bank = DistributedCodeBank(n, d, K, seed=0)
        sync = dist.barrier
    else:
        bank = CodeBank(n, d, K, seed=0)
        sync = lambda: None  # noqa: E731
    sampler = PassSampler(n, b, 0, rank, world)
    batches = sampler.batches(0)
    gen = torch.Generator().manual_seed(1)
    queries = sampler.local(torch.randn(b, d, generator=gen))  # this rank's slice of the global batch

    def search() -> None:
        bank.search(queries)

    def neighbours() -> None:
        idx = next(batches)
        bank.neighbours(idx, torch.randn(idx.numel(), d, generator=gen))

    fns = {"search": search, "neighbours": neighbours}
    if world > 1:
        # The shard search alone (both ranks at once, no collectives): search minus this is
        # the cost of the all-gathers and the merge.
        every = torch.randn(b, d, generator=torch.Generator().manual_seed(1))
        fns["shard_search"] = lambda: masked_topk(every, bank.codes, min(K, bank.codes.shape[0]))
    times: dict[str, float] = {}
    for name, fn in fns.items():
        fn()  # warm-up
        ts = []
        for _ in range(ROUNDS):
            sync()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        times[name] = statistics.median(ts)
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(times))


if __name__ == "__main__":
    r, w, t, n_, b_, d_ = map(int, sys.argv[1:7])
    _measure(r, w, t, n_, b_, d_, sys.argv[7])
