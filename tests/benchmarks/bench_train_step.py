"""One full ACN training step (encode, bank write + neighbours in batch order, prior network, KL,
decoder, backward, Adam) with the fused ops against the same step in plain torch.

Setup (the issue's): bank of 60,000 codes, batch 128, code size 16, K = 5, M = 3, the default MLP
encoder/decoder (784-512-512) and the paper's prior network. Both steps share the model code and
the batch-order resolution; they differ only where the fused ops are used:

- "acn_fused": CodeBank -> acn_kernels.masked_topk (automatic dispatch), the KL by
  acn_kernels.acn_kl;
- "torch": the candidates by addmm + masked_fill + topk over the whole bank, the KL by
  torch.distributions (MixtureSameFamily for log p(z | c-hat), Normal for log q).

extra_info holds the share of the step spent in neighbour search (CodeBank.neighbours: the code
write, the search and the resolution) plus the prior likelihood (the KL op, forward and backward),
each timed alone on the step's shapes, interleaved with whole steps (medians of 30).

Run: flock /tmp/acn_bench.lock pytest tests/benchmarks/bench_train_step.py --benchmark-enable \
         --benchmark-json=step.json -s
then: python scripts/bench_report.py step.json
"""

from __future__ import annotations

import math
import statistics
import time

import pytest
import torch
from conftest import SMOKE, grid
from torch.distributions import Categorical, MixtureSameFamily, Normal

from acn_kernels import ACN, CodeBank, MixturePrior, acn_kl
from acn_kernels.acn.networks import MLPDecoder, MLPEncoder

# (N, B, D): the smoke point first, then the setting.
POINTS = grid([(2_000, 32, 16), (60_000, 128, 16)])
IMPLS = ["acn_fused", "torch"]
K, M = 5, 3


class TorchBank(CodeBank):
    """The same bank, its candidate search written in plain torch."""

    def _candidates(self, queries, k, exclude_mask, exclude_index):
        d = torch.addmm(self.codes.square().sum(1), queries, self.codes.t(), alpha=-2.0)
        d = d + queries.square().sum(1, keepdim=True)
        if exclude_mask is not None:
            d = d.masked_fill(exclude_mask, math.inf)
        d = d.scatter(1, exclude_index.unsqueeze(1), math.inf)
        dists, rows = torch.topk(d, k, dim=1, largest=False)
        return rows.masked_fill(torch.isinf(dists), -1)


def torch_kl(z, code, logits, means, log_scales):
    log_p = MixtureSameFamily(Categorical(logits=logits), Normal(means, log_scales.exp())).log_prob(z).sum(-1)
    return Normal(code, 1.0).log_prob(z).sum(-1) - log_p


class TorchPrior(MixturePrior):
    """The same prior network, its KL through torch.distributions."""

    def kl(self, z, code, c_hat):
        return torch_kl(z, code, *self(c_hat))


def build(impl: str, n: int, d: int) -> ACN:
    torch.manual_seed(0)
    bank_cls, prior_cls = (CodeBank, MixturePrior) if impl == "acn_fused" else (TorchBank, TorchPrior)
    return ACN(MLPEncoder(d), MLPDecoder(d), prior_cls(d, M), bank_cls(n, d, K, seed=0))


class Stepper:
    """Steps through passes of random binary images, as the training loop does."""

    def __init__(self, impl: str, n: int, b: int, d: int) -> None:
        self.model = build(impl, n, d)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.x = (torch.rand(4 * b, 1, 28, 28, generator=torch.Generator().manual_seed(1)) > 0.87).float()
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(2))
        self.n, self.b, self.offset = n, b, 0

    def batch(self) -> torch.Tensor:
        if self.offset + self.b > self.n:
            self.model.new_pass()
            self.offset = 0
        idx = self.order[self.offset : self.offset + self.b]
        self.offset += self.b
        return idx

    def step(self) -> None:
        idx = self.batch()
        terms = self.model(self.x[idx % self.x.shape[0]], idx)
        self.opt.zero_grad(set_to_none=True)
        terms.loss.mean().backward()
        self.opt.step()

    def neighbours(self) -> None:
        idx = self.batch()
        self.model.bank.neighbours(idx, torch.randn(self.b, self.model.bank.code_dim))


def interleaved_medians(fns: list, reps: int) -> list[float]:
    """Median seconds of each function, the functions timed in turn within every repetition so
    that a change in the machine's load affects them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def kl_fwd_bwd(impl: str, b: int, d: int):
    g = torch.Generator().manual_seed(3)
    t = [torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)]
    t += [torch.randn(b, d, M, generator=g).requires_grad_(True) for _ in range(3)]
    t[0].requires_grad_(True)
    fn = acn_kl if impl == "acn_fused" else torch_kl

    def run():
        fn(*t).sum().backward()

    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("point", POINTS, ids=lambda p: "N{}-B{}-D{}".format(*p))
def test_train_step(benchmark, impl, point):
    n, b, d = point
    stepper = Stepper(impl, n, b, d)
    benchmark.group = f"ACN training step N={n} B={b} D={d} K={K} M={M} cpu"
    benchmark.extra_info.update(op="train_step", N=n, B=b, D=d, K=K, M=M, impl=impl, device="cpu",
                                threads=torch.get_num_threads())
    stepper.step()  # warm-up
    benchmark.pedantic(stepper.step, rounds=1 if SMOKE else 30, iterations=1)
    t_step, t_nb, t_kl = interleaved_medians(
        [stepper.step, Stepper(impl, n, b, d).neighbours, kl_fwd_bwd(impl, b, d)], 1 if SMOKE else 30)
    share = (t_nb + t_kl) / t_step
    benchmark.extra_info.update(step_ms=round(1e3 * t_step, 3), neighbours_ms=round(1e3 * t_nb, 3),
                                kl_ms=round(1e3 * t_kl, 3), share_neighbours_kl=round(share, 4))
    print(f"\n{impl} N={n} B={b}: step {1e3 * t_step:.2f} ms, neighbours {1e3 * t_nb:.2f} ms, "
          f"KL fwd+bwd {1e3 * t_kl:.2f} ms -> share {100 * share:.1f}%")
