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
# Issue 16 (reliability)


def large_logit_inputs(b, d, m, kind, scale, *, dtype, device, seed=0):
    """make_inputs with logits far from the origin, drawn in float64 and rounded to ``dtype``.

    kind "scaled": logits * scale (differences of the size of the logits: one-hot weights);
    "offset": a per-row offset of about +-scale plus O(1) differences (distinct weights where the
    dtype resolves them, ties where it rounds them away); "ulps": per-row offsets of about +-scale
    with components a few float32 ulps apart (ties and near-ties).
    """
    z, lg, mu, ls, code = make_inputs(b, d, m, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    row = torch.where(torch.rand(b, 1, 1, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    row = row * scale * (1 + torch.rand(b, 1, 1, generator=g, dtype=torch.float64))
    if kind == "scaled":
        lg = lg * scale
    elif kind == "offset":
        lg = row + lg
    else:
        lg = row * (1 + 2.0**-21 * torch.randint(0, 4, lg.shape, generator=g, dtype=torch.float64))
    return [t.to(dtype=dtype, device=device) for t in (z, lg, mu, ls, code)]


# (backend, device, dtype): float64 where the backend takes it (cpu, torch).
BACKEND_DTYPES = [
    pytest.param(*p.values, dt, id=f"{p.id}-{str(dt)[6:]}", marks=p.marks)
    for p in BACKENDS
    for dt in ((torch.float32, torch.float64) if p.values[0] in ("cpu", "torch") else (torch.float32,))
]


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("kind", ["scaled", "offset", "ulps"])
def test_issue16_large_logits_keep_log_n(backend, device, dtype, kind):
    """log p is a difference of two log-sum-exps, which cancels when taken over raw logits: at
    |logits| ~ 1e10 the float32 kernels returned 0 where log p is about -8. Logits up to 1e30,
    forward and every gradient, against the float64 reference on the same rounded values and
    MixtureSameFamily on the exactly shifted logits (a shift leaves the density unchanged)."""
    b, d = 6, 19  # 19 = one full 16-lane block of the CPU kernel and a staged tail
    for m in (5, 17):  # 17 > the CPU kernel's 16-component chunk
        for scale in (1e3, 1e6, 1e10, 1e20, 1e30):
            z, lg, mu, ls, code = large_logit_inputs(b, d, m, kind, scale, dtype=dtype, device=device,
                                                     seed=m)
            ins = [z, lg, mu, ls]
            with poisoned_outputs():
                out, grads = run_grads(lambda *t: acn_kernels.mixture_log_prob(*t, backend=backend), ins)
                kl = acn_kernels.acn_kl(z, code, lg, mu, ls, backend=backend)
            ref_in = [t.double().cpu() for t in ins]
            want, want_grads = run_grads(reference.mixture_log_prob, ref_in)
            z64, lg64, mu64, ls64 = ref_in
            msf = msf_log_prob(z64, lg64 - lg64.amax(-1, keepdim=True), mu64, ls64)
            ctx = f"{kind} scale={scale:g} M={m}"
            t = tol(dtype)
            assert torch.isfinite(want).all() and want.abs().max() > 1.0, ctx  # a real test
            torch.testing.assert_close(want, msf, rtol=1e-9, atol=1e-9 * d, msg=ctx)
            torch.testing.assert_close(out.cpu().double(), want, rtol=t["rtol"], atol=t["atol"] * d, msg=ctx)
            want_kl = reference.acn_kl(z64, code.double().cpu(), lg64, mu64, ls64)
            torch.testing.assert_close(kl.cpu().double(), want_kl, rtol=t["rtol"], atol=t["atol"] * d, msg=ctx)
            for name, got, w in zip(("dz", "dlogits", "dmeans", "dlog_scales"), grads, want_grads, strict=True):
                scl = w.abs().max().item() + 1.0
                torch.testing.assert_close(got.cpu().double(), w, rtol=t["rtol"] * 10, atol=t["atol"] * scl,
                                           msg=f"{ctx} {name}")


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
def test_issue16_infinite_z_gives_minus_inf_and_zero_gradients(backend, device, dtype):
    """z = +-inf: every term is -inf, so log p = -inf with zero gradients (the documented rule for
    such a dimension); the torch backend gave dz = NaN there (inf - inf inside its harmless
    point). The other dimensions keep their values and gradients."""
    z, lg, mu, ls, _ = make_inputs(3, 18, 4, dtype=dtype, device=device, seed=21)
    z[0, 2], z[2, 17] = math.inf, -math.inf
    with poisoned_outputs():
        out, grads = run_grads(lambda *t: acn_kernels.mixture_log_prob(*t, per_dim=True, backend=backend),
                               [z, lg, mu, ls])
    out, grads = out.cpu(), [g.cpu() for g in grads]
    dead = torch.zeros(3, 18, dtype=torch.bool)
    dead[0, 2] = dead[2, 17] = True
    assert (out[dead] == -math.inf).all()
    for g in grads:
        assert (g[dead] == 0).all() and torch.isfinite(g).all()
    live_in = [t.double().cpu() for t in (z, lg, mu, ls)]
    live_in[0] = torch.where(dead, 0.0, live_in[0])
    want, want_grads = run_grads(lambda *t: reference.mixture_log_prob(*t, per_dim=True), live_in)
    t = tol(dtype)
    torch.testing.assert_close(out[~dead].double(), want[~dead], **t)
    for g, w in zip(grads, want_grads, strict=True):
        scl = w.abs().max().item() + 1.0
        torch.testing.assert_close(g[~dead].double(), w[~dead], rtol=t["rtol"] * 10, atol=t["atol"] * scl)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_issue16_double_backward_raises_or_is_exact(backend, device):
    """A gradient of a gradient through the fused ops: the compiled backends raise a clear error
    (PyTorch only warned and returned zeros); the torch backend differentiates twice."""
    z, lg, mu, ls, code = make_inputs(3, 5, 4, device=device, seed=31,
                                      dtype=torch.float32 if backend in ("triton", "cuda") else torch.float64)
    leaves = [t.requires_grad_() for t in (z, code, lg, mu, ls)]
    kl = acn_kernels.acn_kl(*leaves, backend=backend)
    (gz,) = torch.autograd.grad(kl.sum(), leaves[0], create_graph=True)
    if backend != "torch":
        with pytest.raises(RuntimeError, match="double backward"):
            gz.square().sum().backward()
        return
    assert torch.autograd.gradgradcheck(lambda *t: acn_kernels.acn_kl(*t, backend="torch"), leaves)
