"""Mixture log-likelihood: the fused backends against torch eager, MixtureSameFamily and
torch.compile of the eager function (per shape, dynamic=False, after torch._dynamo.reset()), on
conftest.DEVICE ("cpu", or "cuda" and "triton" on a GPU).

Run: pytest tests/benchmarks/bench_mixture.py --benchmark-enable --benchmark-json=out.json
then: python scripts/bench_report.py out.json
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, grid, synchronized
from testing import mixture_inputs, posterior_log_scale

import acn_kernels
from acn_kernels import reference

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

# (B, D, M); the first is the smoke point, (1024, 32, 5) the headline. The B=2048 points have D
# not a multiple of the CPU kernel's 16-lane blocks (24, 25) or three blocks (48), where the
# backward once fell behind torch.compile (issue 16).
SHAPES = grid([(128, 16, 3), (1024, 32, 5), (128, 64, 10), (1024, 16, 3), (1024, 64, 10), (4096, 32, 5),
               (4096, 64, 10), (4096, 16, 3), (2048, 24, 5), (2048, 25, 8), (2048, 48, 8), (2048, 16, 8)])


def eager(z, logits, means, log_scales):
    """The hand-written torch version a user would write (the eager peer)."""
    u = (z.unsqueeze(-1) - means) * torch.exp(-log_scales)
    log_n = -0.5 * u * u - log_scales - HALF_LOG_2PI
    return torch.logsumexp(torch.log_softmax(logits, -1) + log_n, -1).sum(-1)


def msf(z, logits, means, log_scales):
    mix = torch.distributions.Categorical(logits=logits, validate_args=False)
    comp = torch.distributions.Normal(means, log_scales.exp(), validate_args=False)
    return torch.distributions.MixtureSameFamily(mix, comp, validate_args=False).log_prob(z).sum(-1)


PEERS = {"eager": eager, "mixture_same_family": msf, "torch_compile": None}  # compiled per shape in the test
IMPLS = (["acn_cuda", "acn_triton"] if DEVICE == "cuda" else ["acn_cpu"]) + list(PEERS)


def implementation(impl: str):
    if impl == "torch_compile":
        torch._dynamo.reset()
        return torch.compile(eager, dynamic=False)
    if impl in PEERS:
        return PEERS[impl]
    backend = impl.removeprefix("acn_")
    if not acn_kernels.backends()[backend]:
        pytest.skip(f"the {backend} backend cannot run here")
    return lambda *a: acn_kernels.mixture_log_prob(*a, backend=backend)


def inputs(b, d, m, requires_grad):
    """z, logits, means, log_scales (log-scales in [-1, 0]) on DEVICE."""
    z, lg, mu, ls, _ = mixture_inputs(b, d, m, seed=0, device=DEVICE, log_scales=(-1.0, 0.0))
    return [t.requires_grad_(requires_grad) for t in (z, lg, mu, ls)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-D{}-M{}".format(*s))
def test_mixture(benchmark, device, impl, mode, shape):
    b, d, m = shape
    fn = implementation(impl)
    args = inputs(b, d, m, mode == "fwd+bwd")
    benchmark.group = f"mixture {mode} B={b} D={d} M={m} {device}"
    benchmark.extra_info.update(op="mixture", mode=mode, B=b, D=d, M=m, impl=impl, device=device)

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(*args)
    else:
        def step():
            return torch.autograd.grad(fn(*args).sum(), args)

    step = synchronized(step, device)
    step()  # warm-up (compiles torch.compile's graph, and the Triton kernels, outside the timing)
    result = benchmark(step)
    assert result is not None


# ---------------------------------------------------------------------------------------------
# Issue 13: acn_kl with a posterior log-scale. The fused op (one forward kernel, one backward)
# against the composition it replaced (log q in PyTorch minus the fused mixture_log_prob, as
# acn_kl computed it before), the eager torch KL and torch.compile of it. Self-contained (DEVICE
# and grid from conftest only), one thread in BENCHMARKS.md (OMP_NUM_THREADS=1).

KL_SHAPES = grid([(128, 16, 3), (1024, 32, 5), (4096, 32, 5), (1024, 64, 10)])


def eager_kl(z, code, pls, logits, means, log_scales):
    """The hand-written torch KL estimate: diagonal-Gaussian log q minus :func:`eager`'s log p."""
    v = (z - code) * torch.exp(-pls)
    return (-0.5 * v * v - HALF_LOG_2PI - pls).sum(-1) - eager(z, logits, means, log_scales)


def kl_implementation(impl: str):
    if impl == "torch_compile":
        torch._dynamo.reset()
        return torch.compile(eager_kl, dynamic=False)
    if impl == "eager":
        return eager_kl
    backend = impl.removeprefix("acn_").removeprefix("unfused_")
    if not acn_kernels.backends()[backend]:
        pytest.skip(f"the {backend} backend cannot run here")
    if impl.startswith("unfused_"):
        return lambda z, code, pls, *mix: (reference.gaussian_log_prob(z, code, pls)
                                           - acn_kernels.mixture_log_prob(z, *mix, backend=backend))
    return lambda z, code, pls, *mix: acn_kernels.acn_kl(z, code, *mix, posterior_log_scale=pls, backend=backend)


KL_IMPLS = [i for be in (["cuda", "triton"] if DEVICE == "cuda" else ["cpu"]) for i in ("acn_" + be, "unfused_" + be)]
KL_IMPLS += ["eager", "torch_compile"]


@pytest.mark.parametrize("impl", KL_IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", KL_SHAPES, ids=lambda s: "B{}-D{}-M{}".format(*s))
def test_acn_kl_posterior_log_scale(benchmark, impl, mode, shape):
    b, d, m = shape
    device = DEVICE
    fn = kl_implementation(impl)
    z, lg, mu, ls, code = mixture_inputs(b, d, m, seed=0, device=device, log_scales=(-1.0, 0.0))
    args = [t.requires_grad_(mode == "fwd+bwd") for t in (z, code, posterior_log_scale(code), lg, mu, ls)]
    benchmark.group = f"acn_kl posterior_log_scale {mode} B={b} D={d} M={m} {device}"
    benchmark.extra_info.update(op="acn_kl_scale", mode=mode, B=b, D=d, M=m, impl=impl, device=device)

    def step():
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            out = fn(*args)
            result = torch.autograd.grad(out.sum(), args) if mode == "fwd+bwd" else out
        if device == "cuda":
            torch.cuda.synchronize()  # the kernels' time, not their launch
        return result

    step()  # warm-up (compiles torch.compile's graph, and the Triton kernels, outside the timing)
    assert benchmark(step) is not None
