"""Mixture log-likelihood: the fused backends against torch eager, MixtureSameFamily and
torch.compile of the eager function (per shape, dynamic=False, after torch._dynamo.reset()).

Run: pytest tests/benchmarks/bench_mixture.py --benchmark-enable --benchmark-json=out.json
then: python scripts/bench_report.py out.json
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import grid

import acn_kernels

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

# (B, D, M); the first is the smoke point, (1024, 32, 5) the headline.
SHAPES = grid([(128, 16, 3), (1024, 32, 5), (128, 64, 10), (1024, 16, 3), (1024, 64, 10), (4096, 32, 5),
               (4096, 64, 10), (4096, 16, 3)])


def eager(z, logits, means, log_scales):
    """The hand-written torch version a user would write (the eager peer)."""
    u = (z.unsqueeze(-1) - means) * torch.exp(-log_scales)
    log_n = -0.5 * u * u - log_scales - HALF_LOG_2PI
    return torch.logsumexp(torch.log_softmax(logits, -1) + log_n, -1).sum(-1)


def msf(z, logits, means, log_scales):
    mix = torch.distributions.Categorical(logits=logits, validate_args=False)
    comp = torch.distributions.Normal(means, log_scales.exp(), validate_args=False)
    return torch.distributions.MixtureSameFamily(mix, comp, validate_args=False).log_prob(z).sum(-1)


def implementations(device: str) -> dict:
    impls = {"eager": eager, "mixture_same_family": msf}
    av = acn_kernels.backends()
    if device == "cpu" and av["cpu"]:
        impls["acn_cpu"] = lambda *a: acn_kernels.mixture_log_prob(*a, backend="cpu")
    if device == "cuda":
        for be in ("cuda", "triton"):
            if av[be]:
                impls[f"acn_{be}"] = lambda *a, be=be: acn_kernels.mixture_log_prob(*a, backend=be)
    impls["torch_compile"] = None  # built per shape in the test
    return impls


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = implementations(DEVICE)


def inputs(b, d, m, requires_grad):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(b, d, generator=g), torch.randn(b, d, m, generator=g), torch.randn(b, d, m, generator=g),
          torch.rand(b, d, m, generator=g) - 1.0]
    return [t.to(DEVICE).requires_grad_(requires_grad) for t in ts]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-D{}-M{}".format(*s))
def test_mixture(benchmark, impl, mode, shape):
    b, d, m = shape
    fn = IMPLS[impl]
    if impl == "torch_compile":
        torch._dynamo.reset()
        fn = torch.compile(eager, dynamic=False)
    args = inputs(b, d, m, mode == "fwd+bwd")
    benchmark.group = f"mixture {mode} B={b} D={d} M={m} {DEVICE}"
    benchmark.extra_info.update(op="mixture", mode=mode, B=b, D=d, M=m, impl=impl, device=DEVICE)

    if mode == "fwd":
        def step():
            with torch.no_grad():
                out = fn(*args)
            sync()
            return out
    else:
        def step():
            out = fn(*args).sum()
            grads = torch.autograd.grad(out, args)
            sync()
            return grads

    step()  # warm-up (compiles torch.compile's graph outside the timing)
    result = benchmark(step)
    assert result is not None
