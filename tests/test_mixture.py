"""mixture_log_prob / acn_kl on every runnable backend against the float64 reference and
torch.distributions.MixtureSameFamily: forward, all gradients, edge cases, registration, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from testing import backend_params, poisoned_outputs, requires_ext, tol

import acn_kernels
from acn_kernels import reference

BACKENDS = backend_params(include_torch=True)
COMPILED = backend_params()


def make_inputs(b, d, m, *, dtype=torch.float64, device="cpu", seed=0, scale_lo=-2.0, scale_hi=1.0, logit_scale=2.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=g, dtype=torch.float64) * 2
    logits = torch.randn(b, d, m, generator=g, dtype=torch.float64) * logit_scale
    means = torch.randn(b, d, m, generator=g, dtype=torch.float64) * 2
    log_scales = torch.empty(b, d, m, dtype=torch.float64).uniform_(scale_lo, scale_hi, generator=g)
    code = torch.randn(b, d, generator=g, dtype=torch.float64)
    return [t.to(dtype=dtype, device=device) for t in (z, logits, means, log_scales, code)]


def msf_log_prob(z, logits, means, log_scales):
    """Independent oracle: torch.distributions.MixtureSameFamily per dimension, summed over D."""
    mix = torch.distributions.Categorical(logits=logits)
    comp = torch.distributions.Normal(means, log_scales.exp())
    return torch.distributions.MixtureSameFamily(mix, comp).log_prob(z).sum(-1)


def run_grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = g.to(dtype=out.dtype, device=out.device)
    grads = torch.autograd.grad(out, leaves, g)
    return out.detach(), grads


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 2), (7, 37, 5), (13, 19, 16), (4, 33, 17)])
def test_forward_backward_vs_reference(backend, device, shape):
    b, d, m = shape
    z, lg, mu, ls, _ = make_inputs(b, d, m, dtype=torch.float32, device=device, seed=b * 100 + m)
    ref_in = [t.double().cpu() for t in (z, lg, mu, ls)]
    with poisoned_outputs():
        out, grads = run_grads(lambda *t: acn_kernels.mixture_log_prob(*t, backend=backend), [z, lg, mu, ls])
    ref, ref_grads = run_grads(reference.mixture_log_prob, ref_in)
    assert out.dtype == torch.float32 and out.shape == (b,)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-4 * d)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_matches_mixture_same_family(backend, device):
    z, lg, mu, ls, _ = make_inputs(9, 21, 6, device=device, seed=5)
    if backend == "triton" and device == "cpu":
        z, lg, mu, ls = (t.float() for t in (z, lg, mu, ls))
    out = acn_kernels.mixture_log_prob(z, lg, mu, ls, backend=backend)
    want = msf_log_prob(*(t.double().cpu() for t in (z, lg, mu, ls)))
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_per_dim_and_kl(backend, device):
    z, lg, mu, ls, code = make_inputs(6, 11, 4, dtype=torch.float32, device=device, seed=3)
    ref_in = [t.double().cpu() for t in (z, code, lg, mu, ls)]
    with poisoned_outputs():
        pd, pd_grads = run_grads(
            lambda *t: acn_kernels.mixture_log_prob(*t, per_dim=True, backend=backend), [z, lg, mu, ls]
        )
        kl, kl_grads = run_grads(lambda *t: acn_kernels.acn_kl(*t, backend=backend), [z, code, lg, mu, ls])
    ref_pd, ref_pd_grads = run_grads(lambda *t: reference.mixture_log_prob(*t, per_dim=True), [ref_in[0], *ref_in[2:]])
    ref_kl, ref_kl_grads = run_grads(reference.acn_kl, ref_in)
    assert pd.shape == (6, 11) and kl.shape == (6,)
    torch.testing.assert_close(pd.cpu().double(), ref_pd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kl.cpu().double(), ref_kl, rtol=1e-4, atol=1e-3)
    for got, want in zip(pd_grads + kl_grads, ref_pd_grads + ref_kl_grads, strict=True):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-3, atol=1e-4)


@given(
    b=st.integers(1, 9), d=st.integers(1, 40), m=st.integers(1, 18), seed=st.integers(0, 2**31 - 1),
    scale_lo=st.sampled_from([-12.0, -4.0, -1.0]), scale_hi=st.sampled_from([0.0, 3.0, 8.0]),
    logit_scale=st.sampled_from([0.1, 3.0, 40.0]),
)
@pytest.mark.parametrize("backend,device", COMPILED)
def test_property_float64_and_float32(backend, device, b, d, m, seed, scale_lo, scale_hi, logit_scale):
    dtype = torch.float32 if backend in ("triton", "cuda") else torch.float64
    z, lg, mu, ls, code = make_inputs(b, d, m, dtype=dtype, device=device, seed=seed, scale_lo=scale_lo,
                                      scale_hi=scale_hi, logit_scale=logit_scale)
    ref_in = [t.double().cpu() for t in (z, code, lg, mu, ls)]
    with poisoned_outputs():
        kl, grads = run_grads(lambda *t: acn_kernels.acn_kl(*t, backend=backend), [z, code, lg, mu, ls])
    want, want_grads = run_grads(reference.acn_kl, ref_in)
    t = tol(dtype)
    # log-scales down to -12 make terms of size 1e10: compare relative to the magnitude.
    torch.testing.assert_close(kl.cpu().double(), want, rtol=t["rtol"] * 10, atol=t["atol"] * d)
    for got, w in zip(grads, want_grads, strict=True):
        scale = w.abs().max().item() + 1.0
        torch.testing.assert_close(got.cpu().double(), w, rtol=t["rtol"] * 10, atol=t["atol"] * scale)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_edge_values(backend, device):
    """-inf rows give -inf and zero gradients, zero-weight components get zero gradient, NaN
    propagates, huge and tiny scales stay finite where the true value is."""
    f = torch.float32
    inf = math.inf
    # row 0: every term -inf (tiny scales far from z); row 1: one component with zero weight;
    # row 2: NaN in z; row 3: very wide and very narrow components around z.
    z = torch.tensor([[0.0], [0.5], [math.nan], [1.0]], dtype=f)
    logits = torch.tensor([[[0.0, 0.0]], [[-inf, 1.0]], [[0.0, 0.0]], [[-80.0, 0.0]]], dtype=f)
    means = torch.tensor([[[1e6, -1e6]], [[3.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0 + 1e-3]]], dtype=f)
    log_scales = torch.tensor([[[-60.0, -60.0]], [[0.0, 0.0]], [[0.0, 0.0]], [[30.0, -20.0]]], dtype=f)
    inputs = [t.to(device) for t in (z, logits, means, log_scales)]
    with poisoned_outputs():
        out, grads = run_grads(lambda *t: acn_kernels.mixture_log_prob(*t, backend=backend), inputs)
    out = out.cpu()
    grads = [g.cpu() for g in grads]
    assert out[0].item() == -inf
    for g in grads:
        assert torch.all(g[0] == 0), g[0]
    assert math.isfinite(out[1].item())
    assert grads[1][1, 0, 0] == 0 and grads[2][1, 0, 0] == 0 and grads[3][1, 0, 0] == 0
    assert math.isnan(out[2].item())
    ref = reference.mixture_log_prob(*(t.double().cpu() for t in inputs))
    assert math.isfinite(out[3].item())
    torch.testing.assert_close(out[[1, 3]].double(), ref[[1, 3]], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(backend, device, dtype):
    z, lg, mu, ls, code = make_inputs(5, 23, 3, dtype=dtype, device=device, seed=11)
    with poisoned_outputs():
        out, grads = run_grads(lambda *t: acn_kernels.acn_kl(*t, backend=backend), [z, code, lg, mu, ls])
    want, want_grads = run_grads(reference.acn_kl, [t.double().cpu() for t in (z, code, lg, mu, ls)])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-3, atol=1e-2)
    for got, w in zip(grads, want_grads, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.cpu().double(), w, **tol(dtype))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradcheck_float64(backend):
    if backend == "cpu" and not acn_kernels.backends()["cpu"]:
        pytest.skip("no compiled extension")
    z, lg, mu, ls, code = make_inputs(3, 5, 4, seed=2)
    leaves = [t.requires_grad_() for t in (z, code, lg, mu, ls)]
    assert torch.autograd.gradcheck(lambda *t: acn_kernels.acn_kl(*t, backend=backend), leaves)
    assert torch.autograd.gradcheck(
        lambda z, lg, mu, ls: acn_kernels.mixture_log_prob(z, lg, mu, ls, per_dim=True, backend=backend),
        [leaves[0], *leaves[2:]],
    )


@pytest.mark.parametrize("backend,device", COMPILED)
def test_empty_batch_and_noncontiguous(backend, device):
    z, lg, mu, ls, _ = make_inputs(0, 4, 3, dtype=torch.float32, device=device)
    assert acn_kernels.mixture_log_prob(z, lg, mu, ls, backend=backend).shape == (0,)
    z, lg, mu, ls, _ = make_inputs(6, 8, 3, dtype=torch.float32, device=device, seed=4)
    zt = z.t().contiguous().t()  # same values, transposed strides
    lgt = lg.transpose(0, 1).contiguous().transpose(0, 1)
    got = acn_kernels.mixture_log_prob(zt, lgt, mu, ls, backend=backend)
    torch.testing.assert_close(got, acn_kernels.mixture_log_prob(z, lg, mu, ls, backend="torch"))


@requires_ext
def test_opcheck_cpp_ops():
    z, lg, mu, ls, code = make_inputs(4, 6, 3, dtype=torch.float32, seed=8)
    for c in (None, code):
        for per_dim in (False, True):
            args = tuple(t.requires_grad_() for t in (z.clone(), lg.clone(), mu.clone(), ls.clone()))
            c_in = None if c is None else c.clone().requires_grad_()
            torch.library.opcheck(torch.ops.acn_kernels.mixture_fwd, (*args, c_in, per_dim))
    out, lse = torch.ops.acn_kernels.mixture_fwd(z, lg, mu, ls, code, False)
    torch.library.opcheck(
        torch.ops.acn_kernels.mixture_bwd, (torch.ones_like(out), z, lg, mu, ls, code, lse, False)
    )


@pytest.mark.parametrize("backend,device", COMPILED)
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(backend, device, dynamic):
    torch._dynamo.reset()

    def loss(z, code, lg, mu, ls):
        return acn_kernels.acn_kl(z, code, lg, mu, ls, backend=backend).mean() + acn_kernels.mixture_log_prob(
            z, lg, mu, ls, backend=backend
        ).sum()

    compiled = torch.compile(loss, fullgraph=True, dynamic=dynamic)
    for b in (5, 7):
        z, lg, mu, ls, code = make_inputs(b, 9, 3, dtype=torch.float32, device=device, seed=b)
        inputs = [t.requires_grad_() for t in (z, code, lg, mu, ls)]
        got = compiled(*inputs)
        got.backward()
        got_grads = [t.grad.clone() for t in inputs]
        for t in inputs:
            t.grad = None
        want = loss(*inputs)
        want.backward()
        torch.testing.assert_close(got, want)
        for g, t in zip(got_grads, inputs, strict=True):
            torch.testing.assert_close(g, t.grad)


def test_mixture_nll_loss_module():
    z, lg, mu, ls, _ = make_inputs(4, 6, 3, dtype=torch.float32, seed=9)
    want = -reference.mixture_log_prob(z, lg, mu, ls)
    assert torch.allclose(acn_kernels.MixtureNLLLoss()(z, lg, mu, ls), want.mean(), atol=1e-5)
    assert torch.allclose(acn_kernels.MixtureNLLLoss("sum")(z, lg, mu, ls), want.sum(), atol=1e-4)
    assert torch.allclose(acn_kernels.MixtureNLLLoss("none")(z, lg, mu, ls), want, atol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        acn_kernels.MixtureNLLLoss("avg")


# ---------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument, on every backend (the checks run before dispatch)


def _good():
    return make_inputs(2, 3, 4, dtype=torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda a: a.__setitem__(0, a[0][0]), ValueError, "z must have shape"),
        (lambda a: a.__setitem__(1, a[1][0]), ValueError, "logits must have shape"),
        (lambda a: a.__setitem__(2, a[2][:, :2]), ValueError, "means has shape"),
        (lambda a: a.__setitem__(3, a[3][..., :2]), ValueError, "log_scales has 2 components"),
        (lambda a: a.__setitem__(3, a[3].double()), TypeError, "log_scales has dtype"),
        (lambda a: a.__setitem__(0, a[0].long()), TypeError, "z must be a floating-point"),
        (lambda a: a.__setitem__(2, a[2].to("meta")), ValueError, "means is on meta"),
        (lambda a: a.__setitem__(1, a[1][..., :0]), ValueError, "at least one component"),
        (lambda a: a.__setitem__(4, a[4][:1]), ValueError, "code has shape"),
    ],
)
def test_bad_input(backend, device, mutate, exc, pattern):
    args = [t.to(device) for t in _good()]
    mutate(args)
    z, lg, mu, ls, code = args
    with pytest.raises(exc, match=pattern):
        acn_kernels.acn_kl(z, code, lg, mu, ls, backend=backend)


def test_nan_input_gives_nan():
    z, lg, mu, ls, _ = make_inputs(3, 4, 2, dtype=torch.float32)
    mu[1, 2, 1] = math.nan
    for be in [p.values[0] for p in BACKENDS if p.values[1] == "cpu"]:
        out = acn_kernels.mixture_log_prob(z, lg, mu, ls, backend=be)
        assert math.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all(), be


# ---------------------------------------------------------------------------------------------
# Issue 13: one Gaussian per dimension (as_mixture) and its closed-form KL (gaussian_kl)


def normal_kl_oracle(code, prior_mean, prior_log_scale, posterior_log_scale=None):
    """torch.distributions' KL(N(code, s_q) || N(mean, s_p)) summed over D (float64 inputs)."""
    s_q = torch.ones_like(code) if posterior_log_scale is None else posterior_log_scale.exp()
    q = torch.distributions.Normal(code, s_q)
    return torch.distributions.kl_divergence(q, torch.distributions.Normal(prior_mean, prior_log_scale.exp())).sum(-1)


def mp_gaussian_kl(code, prior_mean, prior_log_scale, posterior_log_scale):
    """The closed form in 60-digit arithmetic, from the inputs' exact binary values: [B] float64."""
    import mpmath

    mpmath.mp.dps = 60
    out = []
    for c, m, lp, lq in zip(*(t.double().tolist() for t in (code, prior_mean, prior_log_scale, posterior_log_scale)),
                            strict=True):
        total = mpmath.mpf(0)
        for cd, md, lpd, lqd in zip(c, m, lp, lq, strict=True):
            t = mpmath.mpf(lqd) - mpmath.mpf(lpd)
            u = (mpmath.mpf(cd) - mpmath.mpf(md)) * mpmath.exp(-mpmath.mpf(lpd))
            total += (mpmath.exp(2 * t) - 1 - 2 * t) / 2 + u * u / 2
        out.append(float(total))
    return torch.tensor(out, dtype=torch.float64)


def gaussian_inputs(b, d, *, seed, offset=0.0, scale_lo=-3.0, scale_hi=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    code = torch.randn(b, d, generator=g, dtype=torch.float64) * 2 + offset
    mean = torch.randn(b, d, generator=g, dtype=torch.float64) * 2 + offset
    lp = torch.empty(b, d, dtype=torch.float64).uniform_(scale_lo, scale_hi, generator=g)
    lq = torch.empty(b, d, dtype=torch.float64).uniform_(scale_lo, scale_hi, generator=g)
    return [t.to(dtype) for t in (code, mean, lp, lq)]


@pytest.mark.parametrize("offset,scale_lo,scale_hi", [(0.0, -3.0, 3.0), (1e4, -3.0, 3.0), (0.0, -20.0, 20.0)])
def test_gaussian_kl_matches_torch_distributions(offset, scale_lo, scale_hi):
    """float64 against torch.distributions, far from the origin and at huge and tiny scales;
    float32 against the same values, relative to them; gradients against autograd of the
    torch.distributions formula."""
    code, mean, lp, lq = gaussian_inputs(6, 17, seed=3, offset=offset, scale_lo=scale_lo, scale_hi=scale_hi)
    want = normal_kl_oracle(code, mean, lp, lq)
    got = acn_kernels.gaussian_kl(code, mean, lp, posterior_log_scale=lq)
    assert got.dtype == torch.float64 and got.shape == (6,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(acn_kernels.gaussian_kl(code, mean, lp), normal_kl_oracle(code, mean, lp),
                               rtol=1e-12, atol=0)
    f32 = acn_kernels.gaussian_kl(*(t.float() for t in (code, mean, lp)), posterior_log_scale=lq.float())
    want32 = normal_kl_oracle(*(t.float().double() for t in (code, mean, lp, lq)))
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), want32, rtol=1e-5, atol=0)
    got_v, got_g = run_grads(lambda *t: acn_kernels.gaussian_kl(*t[:3], posterior_log_scale=t[3]),
                             [code, mean, lp, lq])
    want_v, want_g = run_grads(normal_kl_oracle, [code, mean, lp, lq])
    for g_, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g_, w, rtol=1e-9, atol=1e-9 * (w.abs().max().item() + 1))


def test_gaussian_kl_near_equal_scales_keeps_its_digits():
    """Where q and p nearly agree the KL is tiny, and the textbook form (ratio - 1 - log ratio)
    cancels; gaussian_kl keeps the relative accuracy of the dtype (against 60-digit values)."""
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(4, 9, generator=g, dtype=torch.float64)
    lq = lp + torch.randn(4, 9, generator=g, dtype=torch.float64) * 1e-5
    mean = torch.randn(4, 9, generator=g, dtype=torch.float64)
    code = mean.clone()  # no mean term: the scale term alone, of size ~1e-10
    for dtype, rtol in ((torch.float64, 1e-13), (torch.float32, 1e-5)):
        args = [t.to(dtype) for t in (code, mean, lp, lq)]
        want = mp_gaussian_kl(*args)
        got = acn_kernels.gaussian_kl(*args[:3], posterior_log_scale=args[3])
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)
    # The series/direct switch (|2t| = 1) is continuous to the dtype's precision.
    lq = torch.tensor([[0.5 - 1e-12, 0.5 + 1e-12, -0.5 - 1e-12, -0.5 + 1e-12]], dtype=torch.float64)
    zero = torch.zeros_like(lq)
    torch.testing.assert_close(acn_kernels.gaussian_kl(zero, zero, zero, posterior_log_scale=lq),
                               mp_gaussian_kl(zero, zero, zero, lq), rtol=1e-14, atol=0)


def test_gaussian_kl_gradcheck_shapes_and_edges():
    code, mean, lp, lq = (t.requires_grad_() for t in gaussian_inputs(3, 4, seed=1))
    assert torch.autograd.gradcheck(
        lambda *t: acn_kernels.gaussian_kl(*t[:3], posterior_log_scale=t[3]), [code, mean, lp, lq])
    small = [t.detach().clone().requires_grad_() for t in (code, mean, lp)]
    small[2] = (small[2] * 1e-4).detach().requires_grad_()  # the series branch
    assert torch.autograd.gradcheck(lambda *t: acn_kernels.gaussian_kl(*t), small)
    # [B, D, 1] prior parameters (an M = 1 mixture's) give the same value.
    c, m, p = (t.detach() for t in (code, mean, lp))
    torch.testing.assert_close(acn_kernels.gaussian_kl(c, m.unsqueeze(-1), p.unsqueeze(-1)),
                               acn_kernels.gaussian_kl(c, m, p), rtol=0, atol=0)
    # Half inputs accumulate in float32; an overflowing KL is +inf with a finite, huge gradient
    # path nowhere NaN; NaN in gives NaN out.
    h = acn_kernels.gaussian_kl(*(t.half() for t in (c, m, p)))
    assert h.dtype == torch.float32
    torch.testing.assert_close(h.double(), normal_kl_oracle(*(t.half().double() for t in (c, m, p))),
                               rtol=1e-5, atol=0)
    big = torch.tensor([[0.0]], requires_grad=True)
    out = acn_kernels.gaussian_kl(big, torch.zeros(1, 1), torch.zeros(1, 1),
                                  posterior_log_scale=torch.full((1, 1), 50.0))
    assert out.item() == math.inf
    out.backward()
    assert not torch.isnan(big.grad).any()
    nan = acn_kernels.gaussian_kl(torch.tensor([[math.nan, 0.0], [0.0, 0.0]]), torch.zeros(2, 2), torch.zeros(2, 2))
    assert math.isnan(nan[0]) and nan[1].item() == 0.0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_one_sample_estimate_averages_to_gaussian_kl(backend, device):
    """acn_kl over z ~ q averages to gaussian_kl (the estimator is unbiased); at z = code (the
    evaluation habit) it is not the KL."""
    n, d = 20000, 3
    g = torch.Generator().manual_seed(4)
    code = (torch.randn(1, d, generator=g, dtype=torch.float64) + 0.5).expand(n, d)
    mean = torch.randn(1, d, generator=g, dtype=torch.float64).expand(n, d)
    lp = torch.tensor([[0.3, -0.4, 0.1]], dtype=torch.float64).expand(n, d)
    lq = torch.tensor([[-0.2, 0.2, 0.0]], dtype=torch.float64).expand(n, d)
    z = code + lq.exp() * torch.randn(n, d, generator=g, dtype=torch.float64)
    dt = torch.float32 if backend == "triton" else torch.float64
    args = [t.contiguous().to(dtype=dt, device=device) for t in (z, code, mean, lp, lq)]
    z_, code_, mean_, lp_, lq_ = args
    est = acn_kernels.acn_kl(z_, code_, *acn_kernels.as_mixture(mean_, lp_), posterior_log_scale=lq_,
                             backend=backend).double().cpu()
    exact = acn_kernels.gaussian_kl(code[:1], mean[:1], lp[:1], posterior_log_scale=lq[:1]).item()
    assert abs(est.mean().item() - exact) < 4 * est.std().item() / math.sqrt(n)
    at_mode = acn_kernels.acn_kl(code_[:1], code_[:1], *acn_kernels.as_mixture(mean_[:1], lp_[:1]),
                                 posterior_log_scale=lq_[:1], backend=backend).item()
    assert abs(at_mode - exact) > 0.5


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_as_mixture_is_one_gaussian(backend, device):
    """acn_kl over as_mixture(mean, log_scale) is log N(z; code, I) - log N(z; mean, s) per row,
    forward and gradients to the Gaussian's mean and log-scale."""
    code, mean, lp, _ = gaussian_inputs(5, 13, seed=8)
    z = code + torch.randn(5, 13, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    logits, means, log_scales = acn_kernels.as_mixture(mean, lp)
    assert logits.shape == means.shape == log_scales.shape == (5, 13, 1)
    assert not logits.any() and means.data_ptr() == mean.data_ptr()
    dt = torch.float32 if backend == "triton" else torch.float64

    def fused(z, code, mean, lp):
        return acn_kernels.acn_kl(z, code, *acn_kernels.as_mixture(mean, lp), backend=backend)

    def oracle(z, code, mean, lp):
        return (torch.distributions.Normal(code, 1.0).log_prob(z)
                - torch.distributions.Normal(mean, lp.exp()).log_prob(z)).sum(-1)

    with poisoned_outputs():
        got, got_g = run_grads(fused, [t.to(dtype=dt, device=device) for t in (z, code, mean, lp)])
    want, want_g = run_grads(oracle, [z, code, mean, lp])
    t = tol(dt)
    torch.testing.assert_close(got.cpu().double(), want, rtol=t["rtol"], atol=t["atol"] * 13)
    for g_, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g_.cpu().double(), w, **t)


@pytest.mark.parametrize(("call", "exc", "pattern"), [
    (lambda c, m, s: acn_kernels.gaussian_kl(c[0], m, s), ValueError, r"code must have shape \[B, D\]"),
    (lambda c, m, s: acn_kernels.gaussian_kl(c, m[:, :2], s), ValueError, "prior_mean must have shape"),
    (lambda c, m, s: acn_kernels.gaussian_kl(c, m.unsqueeze(-1).expand(2, 3, 2), s), ValueError, "prior_mean"),
    (lambda c, m, s: acn_kernels.gaussian_kl(c, m, s[:1]), ValueError, "prior_log_scale has shape"),
    (lambda c, m, s: acn_kernels.gaussian_kl(c, m, s.double()), TypeError, "prior_log_scale has dtype"),
    (lambda c, m, s: acn_kernels.gaussian_kl(c, m, s, posterior_log_scale=s[:1]), ValueError,
     "posterior_log_scale has shape"),
    (lambda c, m, s: acn_kernels.gaussian_kl(c.long(), m, s), TypeError, "code must be a floating-point"),
    (lambda c, m, s: acn_kernels.gaussian_kl(c, m.to("meta"), s), ValueError, "prior_mean is on meta"),
    (lambda c, m, s: acn_kernels.as_mixture(m[0], s), ValueError, r"mean must have shape \[B, D\]"),
    (lambda c, m, s: acn_kernels.as_mixture(m, s[:, :1]), ValueError, "log_scale has shape"),
    (lambda c, m, s: acn_kernels.as_mixture(m, 0.0), TypeError, "log_scale must be a torch.Tensor"),
])
def test_gaussian_bad_input(call, exc, pattern):
    c, m, s = torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(exc, match=pattern):
        call(c, m, s)


# ---------------------------------------------------------------------------------------------
# Issue 13: acn_kl with a posterior log-scale, q = N(code, diag(exp(2 posterior_log_scale)))


def posterior_inputs(b, d, m, *, dtype, device, seed, offset=0.0, pls_lo=-2.0, pls_hi=2.0):
    """make_inputs shifted by ``offset`` (z, code and the means alike) plus a posterior log-scale,
    with z a draw from q."""
    z, lg, mu, ls, code = make_inputs(b, d, m, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    pls = torch.empty(b, d, dtype=torch.float64).uniform_(pls_lo, pls_hi, generator=g)
    z = code + pls.exp() * torch.randn(b, d, generator=g, dtype=torch.float64)
    z, mu, code = z + offset, mu + offset, code + offset
    return [t.to(dtype=dtype, device=device) for t in (z, code, lg, mu, ls, pls)]


def posterior_oracle(z, code, lg, mu, ls, pls):
    """torch.distributions: Normal(code, exp(pls)) against MixtureSameFamily, summed over D."""
    return torch.distributions.Normal(code, pls.exp()).log_prob(z).sum(-1) - msf_log_prob(z, lg, mu, ls)


def _kl_with_scale(backend):
    return lambda z, code, lg, mu, ls, pls: acn_kernels.acn_kl(z, code, lg, mu, ls, posterior_log_scale=pls,
                                                               backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", ["plain", "far", "scales"])
def test_posterior_log_scale_vs_reference(backend, device, case):
    """Forward and all six gradients against the float64 reference, with poisoned outputs; far
    from the origin (1e3) and at huge and tiny posterior scales (log-scales in [-8, 8])."""
    offset, lo, hi = {"plain": (0.0, -2.0, 2.0), "far": (1e3, -2.0, 2.0), "scales": (0.0, -8.0, 8.0)}[case]
    dtype = torch.float32 if backend == "triton" else torch.float64
    for dt in sorted({dtype, torch.float32}, key=str):
        inputs = posterior_inputs(5, 19, 3, dtype=dt, device=device, seed=7, offset=offset, pls_lo=lo, pls_hi=hi)
        with poisoned_outputs():
            got, got_g = run_grads(_kl_with_scale(backend), inputs)
        want, want_g = run_grads(reference.acn_kl, [t.double().cpu() for t in inputs])
        assert got.dtype == reference.acc_dtype(dt) and got.shape == (5,)
        t = tol(dt)
        # Terms of size up to exp(16) * z^2: compare relative to each result's magnitude.
        torch.testing.assert_close(got.cpu().double(), want, rtol=t["rtol"] * 10,
                                   atol=t["atol"] * (want.abs().max().item() + 1))
        for g_, w in zip(got_g, want_g, strict=True):
            torch.testing.assert_close(g_.cpu().double(), w, rtol=t["rtol"] * 10,
                                       atol=t["atol"] * (w.abs().max().item() + 1))


def test_posterior_log_scale_matches_torch_distributions():
    inputs = posterior_inputs(6, 11, 4, dtype=torch.float64, device="cpu", seed=3)
    for backend, _ in [p.values for p in BACKENDS if p.values[1] == "cpu" and p.values[0] != "triton"]:
        got = acn_kernels.acn_kl(*inputs[:5], posterior_log_scale=inputs[5], backend=backend)
        torch.testing.assert_close(got, posterior_oracle(*inputs), rtol=1e-10, atol=1e-10)
    # Its gradients agree with autograd through torch.distributions (the reference's are tested
    # against the kernels above).
    _, want_g = run_grads(posterior_oracle, inputs)
    _, got_g = run_grads(_kl_with_scale("torch"), inputs)
    for g_, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g_, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_posterior_log_scale_is_the_unit_posterior(backend, device):
    dt = torch.float32
    z, code, lg, mu, ls, _ = posterior_inputs(4, 9, 2, dtype=dt, device=device, seed=5)
    plain, plain_g = run_grads(lambda *t: acn_kernels.acn_kl(*t, backend=backend), [z, code, lg, mu, ls])
    zero = torch.zeros_like(z)
    scaled, scaled_g = run_grads(_kl_with_scale(backend), [z, code, lg, mu, ls, zero])
    torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=1e-5)
    for g_, w in zip(scaled_g[:5], plain_g, strict=True):
        torch.testing.assert_close(g_, w, rtol=1e-6, atol=1e-6)
    # d KL / d log s_q = v^2 - 1 per dimension, v = z - code at log s_q = 0 (times run_grads' g).
    v = (z - code).double()
    g = torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    torch.testing.assert_close(scaled_g[5].double(), (v * v - 1) * g[:, None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_posterior_log_scale_gradcheck_float64(backend):
    if backend == "cpu" and not acn_kernels.backends()["cpu"]:
        pytest.skip("no compiled extension")
    leaves = [t.requires_grad_() for t in posterior_inputs(3, 4, 3, dtype=torch.float64, device="cpu", seed=2)]
    assert torch.autograd.gradcheck(_kl_with_scale(backend), leaves)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_posterior_log_scale_low_precision(backend, device, dtype):
    inputs = posterior_inputs(5, 23, 3, dtype=dtype, device=device, seed=11)
    with poisoned_outputs():
        got, got_g = run_grads(_kl_with_scale(backend), inputs)
    want, want_g = run_grads(reference.acn_kl, [t.double().cpu() for t in inputs])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-3, atol=1e-2)
    for g_, w in zip(got_g, want_g, strict=True):
        assert g_.dtype == dtype
        torch.testing.assert_close(g_.cpu().double(), w, **tol(dtype))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_posterior_log_scale_nan_and_bad_input(backend, device):
    z, code, lg, mu, ls, pls = posterior_inputs(3, 4, 2, dtype=torch.float32, device=device, seed=1)
    pls[1, 2] = math.nan
    out = acn_kernels.acn_kl(z, code, lg, mu, ls, posterior_log_scale=pls, backend=backend).cpu()
    assert math.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    for bad, exc, pattern in [(pls[:2], ValueError, "posterior_log_scale has shape"),
                              (pls.double(), TypeError, "posterior_log_scale has dtype"),
                              (pls.long(), TypeError, "posterior_log_scale must be a floating-point"),
                              (pls.to("meta"), ValueError, "posterior_log_scale is on meta"),
                              (0.5, TypeError, "posterior_log_scale must be a torch.Tensor")]:
        with pytest.raises(exc, match=pattern):
            acn_kernels.acn_kl(z, code, lg, mu, ls, posterior_log_scale=bad, backend=backend)


@pytest.mark.parametrize("backend,device", COMPILED)
def test_posterior_log_scale_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    fn = _kl_with_scale(backend)
    compiled = torch.compile(lambda *t: fn(*t).sum(), fullgraph=True)
    inputs = [t.requires_grad_() for t in posterior_inputs(5, 9, 3, dtype=torch.float32, device=device, seed=4)]
    got = compiled(*inputs)
    got_g = torch.autograd.grad(got, inputs)
    want = fn(*inputs).sum()
    want_g = torch.autograd.grad(want, inputs)
    torch.testing.assert_close(got, want)
    for g_, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g_, w)
