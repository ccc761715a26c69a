"""Mixture log-likelihood: the fused backends against torch eager, MixtureSameFamily and
torch.compile of the eager function (per shape, dynamic=False, after torch._dynamo.reset()), on
conftest.DEVICE ("cpu", or "cuda" and "triton" on a GPU).

On a GPU the grid is the issue's (B up to 65,536, D 16..64, M 3..10; GPU_SHAPES, GPU_FIXED first:
the points of scripts/gpu_check.sh bench), timed with the CUDA-event clock (conftest.TIMER);
each result carries its memory floor (conftest.record_floor: every input read once and every
output written once, at the device's copy bandwidth).

Run: pytest tests/benchmarks/bench_mixture.py --benchmark-enable --benchmark-json=out.json
then: python scripts/bench_report.py out.json
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import DEVICE, device_marks, gpu_grid, grid, record_floor
from testing import mixture_inputs, posterior_log_scale

import acn_kernels
from acn_kernels import reference

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

# (B, D, M); the first is the smoke point, (1024, 32, 5) the headline. The B=2048 points have D
# not a multiple of the CPU kernel's 16-lane blocks (24, 25) or three blocks (48), where the
# backward once fell behind torch.compile (issue 16).
CPU_SHAPES = grid([(128, 16, 3), (1024, 32, 5), (128, 64, 10), (1024, 16, 3), (1024, 64, 10), (4096, 32, 5),
                   (4096, 64, 10), (4096, 16, 3), (2048, 24, 5), (2048, 25, 8), (2048, 48, 8), (2048, 16, 8)])
# GPU: (B, D, M, mode); GPU_FIXED is the goal shape (within 1.5x of the memory floor, fwd+bwd).
GPU_FIXED = [(65_536, 64, 8, "fwd+bwd"), (65_536, 64, 8, "fwd")]
GPU_SHAPES = gpu_grid([(s, mode) for s in [(4096, 16, 3), (65_536, 16, 3), (65_536, 32, 5), (65_536, 64, 10)]
                       for mode in ("fwd", "fwd+bwd")], [((b, d, m), mode) for b, d, m, mode in GPU_FIXED])
MODES = ("fwd", "fwd+bwd")


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
# torch_compile last at each GPU shape: scripts/gpu_check.sh times it in a second pass.
CASES = [pytest.param("cpu", impl, mode, s, id="B{}-D{}-M{}-{}-{}".format(*s, mode, impl), marks=device_marks("cpu"))
         for s in CPU_SHAPES for mode in MODES for impl in ["acn_cpu", *PEERS]]
CASES += [pytest.param("cuda", impl, mode, s, id="B{}-D{}-M{}-{}-{}-cuda".format(*s, mode, impl),
                       marks=device_marks("cuda"))
          for s, mode in GPU_SHAPES for impl in ["acn_cuda", "acn_triton", *PEERS]]


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


@functools.lru_cache(maxsize=1)  # the cases run shape by shape: one problem in memory at a time
def _drawn(device, b, d, m):
    z, lg, mu, ls, _ = mixture_inputs(b, d, m, seed=0, device=device, log_scales=(-1.0, 0.0))
    return z, lg, mu, ls


def inputs(device, b, d, m, requires_grad):
    """z, logits, means, log_scales (log-scales in [-1, 0]) on ``device``, drawn once per shape."""
    return [t.detach().requires_grad_(requires_grad) for t in _drawn(device, b, d, m)]


@pytest.mark.parametrize("device,impl,mode,shape", CASES)
def test_mixture(benchmark, floors, device, impl, mode, shape):
    b, d, m = shape
    fn = implementation(impl)
    args = inputs(device, b, d, m, mode == "fwd+bwd")
    benchmark.group = f"mixture {mode} B={b} D={d} M={m} {device}"
    benchmark.extra_info.update(op="mixture", mode=mode, B=b, D=d, M=m, impl=impl, device=device)
    once = 4 * (b * d + 3 * b * d * m) + 4 * b  # float32 inputs read once, the [B] result written once
    record_floor(benchmark, floors, flops=0.0, matmul=None, nbytes=once if mode == "fwd" else 2 * once)

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(*args)
    else:
        def step():
            return torch.autograd.grad(fn(*args).sum(), args)

    step()  # warm-up (compiles torch.compile's graph, and the Triton kernels, outside the timing)
    result = benchmark(step) if device == "cpu" else benchmark.pedantic(step, rounds=20, warmup_rounds=2, iterations=1)
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
