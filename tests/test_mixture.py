"""mixture_log_prob and acn_kl's contract (docs/design.md, "mixture_log_prob and acn_kl"), each
rule once, on every backend x device x dtype of the capability table (testing.params): forward
and every gradient against the float64 reference and torch.distributions.MixtureSameFamily,
with tolerances relative to the result; extreme parameters, -inf dimensions, zero-weight
components, NaN; empty and non-contiguous inputs; registration (opcheck, torch.compile),
gradcheck, bad input, streams. Kernel outputs are poisoned.

ACN_TEST_FILL_GPU=1 enables a size that fills a GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from testing import (
    COMPILED,
    MIXTURE_KINDS,
    RTOL,
    assert_close,
    backend_params,
    check_mixture,
    f64,
    interpreted,
    mixture_grad_scale,
    mixture_inputs,
    mixture_op,
    mixture_result_scale,
    op_inputs,
    params,
    poisoned_outputs,
    posterior_log_scale,
    row_scale,
    unsupported_params,
    value_and_grads,
)

import acn_kernels
from acn_kernels import reference

OP = "mixture"
ALL = params(OP)
F32 = params(OP, dtypes=[torch.float32])
GPU = params(OP, dtypes=[torch.float32], devices=["cuda"])
FILL_GPU = os.environ.get("ACN_TEST_FILL_GPU", "0") == "1"
pytestmark = [
    # The Triton interpreter evaluates masked-off lanes too (e.g. -inf - -inf); numpy warns.
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]


# ---------------------------------------------------------------------------------------------
# Against the reference


# M = 1, 2, 3 (the CPU kernel's transposed forward from 3), 12 (its largest transposed M), 13,
# 16 (one 16-component chunk), 17 and 67 (several chunks; 67 > the interpreter's 64-component
# block); D = 1 (one CUDA lane per row), 16 (two rows per warp), 37 / 70 / 100 (lanes loop over
# D; across the 64- and 32-wide Triton blocks); B * D below, at and off multiples of 16 lanes.
SHAPES = [(1, 1, 1), (3, 5, 2), (7, 37, 5), (5, 70, 16), (33, 3, 9), (4, 6, 67), (130, 2, 3), (3, 100, 17),
          (300, 7, 2), (5, 16, 12), (2, 9, 13)]


@pytest.mark.parametrize("backend,device,dtype", ALL)
@pytest.mark.parametrize("kind", MIXTURE_KINDS)
@pytest.mark.parametrize("b,d,m", SHAPES)
def test_vs_reference(backend, device, dtype, kind, b, d, m):
    inputs = mixture_inputs(b, d, m, seed=b * 1000 + d * 10 + m, dtype=dtype, device=device)
    check_mixture(kind, backend, inputs)


@pytest.mark.parametrize("backend,device,dtype", ALL)
@given(b=st.integers(1, 9), d=st.integers(1, 40), m=st.integers(1, 18), seed=st.integers(0, 2**31 - 1),
       lo=st.sampled_from([-12.0, -4.0, -1.0]), hi=st.sampled_from([0.0, 3.0, 8.0]),
       logit_scale=st.sampled_from([0.1, 3.0, 40.0]), loc=st.sampled_from([0.0, 50.0]),
       kind=st.sampled_from(MIXTURE_KINDS))
def test_property_vs_reference(backend, device, dtype, b, d, m, seed, lo, hi, logit_scale, loc, kind):
    """Fresh random shapes and values: log-scales from -12 to 8 (terms up to 1e10), logits up to
    +-100 and more, data far from the origin; forward and every gradient."""
    inputs = mixture_inputs(b, d, m, seed=seed, dtype=dtype, device=device, log_scales=(lo, hi),
                            logit_scale=logit_scale, loc=loc)
    check_mixture(kind, backend, inputs)


def msf_log_prob(z, logits, means, log_scales):
    """The independent oracle: torch.distributions.MixtureSameFamily per dimension, summed over D."""
    mix = torch.distributions.Categorical(logits=logits)
    comp = torch.distributions.Normal(means, log_scales.exp())
    return torch.distributions.MixtureSameFamily(mix, comp).log_prob(z).sum(-1)


@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_matches_mixture_same_family(backend, device, dtype):
    """The density MixtureSameFamily defines, forward and gradients."""
    args = op_inputs("log_prob", mixture_inputs(9, 21, 6, seed=5, dtype=dtype, device=device))
    with poisoned_outputs():
        out, grads = value_and_grads(mixture_op("log_prob", backend), args)
    want, want_grads = value_and_grads(msf_log_prob, f64(args))
    acc = reference.acc_dtype(dtype)
    assert_close(out, want, rtol=RTOL[acc], scale=mixture_result_scale("log_prob", f64(args)))
    s = mixture_grad_scale(want_grads)
    for g, w in zip(grads, want_grads, strict=True):
        assert_close(g, w.to(dtype), rtol=2 * RTOL[dtype], scale=s if w.dim() == 3 else s.squeeze(-1))


@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_extreme_parameters(backend, device, dtype):
    """Large and tiny scales, very negative logits, z at the means, negligible components next
    to ordinary ones: finite, and the reference's values and gradients."""
    z, lg, mu, ls, code = mixture_inputs(6, 13, 5, seed=11, dtype=torch.float64)
    ls[0] = -12.0  # sigma 6e-6: huge |u|, a sharply peaked density
    ls[1] = 25.0  # sigma 7e10
    lg[2, :, 0] = -1e4  # a practically absent component
    lg[3] = -80.0  # every logit very negative (log-softmax must be shift-invariant)
    lg[3, :, 1] = -85.0
    mu[4] = z[4].unsqueeze(-1) + 1e-3  # z right at the means
    ls[4] = -6.0
    ls[5, :, :2] = -30.0  # two components of negligible density next to ordinary ones
    inputs = [t.to(dtype=dtype, device=device) for t in (z, lg, mu, ls, code)]
    for kind in MIXTURE_KINDS:
        (out, grads), _ = check_mixture(kind, backend, inputs)  # gradients: finite where representable
        assert torch.isfinite(out).all(), kind


@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_dead_dimension_gives_minus_inf_and_zero_grads(backend, device, dtype):
    """A dimension whose every term is -inf in the result dtype (every component far away with a
    tiny scale; not representable, not NaN): -inf with zero gradients, as the reference gives in
    that dtype; the other dimensions and rows are unaffected; acn_kl is +inf there (with a
    posterior log-scale too), with dz, dcode (and dposterior_log_scale) from log q alone."""
    dead_ls = -80.0 if reference.acc_dtype(dtype) == torch.float32 else -800.0  # 1 / sigma overflows
    z, lg, mu, ls, code = mixture_inputs(4, 7, 3, seed=13, dtype=dtype, device=device)
    mu[1, 2] = z[1, 2] + 1.0
    ls[1, 2] = dead_ls
    for kind in MIXTURE_KINDS:
        args = op_inputs(kind, [z, lg, mu, ls, code])
        with poisoned_outputs():
            out, grads = value_and_grads(mixture_op(kind, backend), args)
        acc_args = [t.to(reference.acc_dtype(dtype)).cpu() for t in args]
        want, want_grads = value_and_grads(mixture_op(kind, "torch"), acc_args)
        dead = (1, 2) if kind == "log_prob_per_dim" else (1,)
        kl = kind.startswith("acn_kl")
        assert out[dead] == (math.inf if kl else -math.inf), kind
        assert_close(out, want, rtol=RTOL[reference.acc_dtype(dtype)], msg=kind)
        for g, w in zip(grads, want_grads, strict=True):
            assert torch.isfinite(g).all(), kind
            assert_close(g, w, rtol=2 * RTOL[dtype], msg=kind)
        g_mix = grads[2:5] if kl else grads[1:]
        assert all((g[1, 2] == 0).all() for g in g_mix), kind
        if kl:
            assert grads[1][1, 2] != 0 and grads[0][1, 2] == -grads[1][1, 2]
        else:
            assert grads[0][1, 2] == 0


@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_zero_weight_component_gets_zero_gradients(backend, device, dtype):
    """A component with logit -inf (and a scale that would give inf * 0 = NaN without the rule)
    contributes nothing and gets exactly zero gradients."""
    z, lg, mu, ls, code = mixture_inputs(5, 8, 4, seed=17, dtype=dtype, device=device)
    lg[:, :, 2] = -math.inf
    ls[:, :, 2] = -60.0
    for kind in MIXTURE_KINDS:
        (_, grads), _ = check_mixture(kind, backend, [z, lg, mu, ls, code])
        for g in (grads[2:5] if kind.startswith("acn_kl") else grads[1:]):
            assert (g[:, :, 2] == 0).all(), kind


@pytest.mark.parametrize("backend,device,dtype", F32)
@pytest.mark.parametrize("where", ["z", "logits", "means", "log_scales", "code", "posterior_log_scale"])
def test_nan_in_nan_out(backend, device, dtype, where):
    z, lg, mu, ls, code = mixture_inputs(4, 6, 3, seed=19, dtype=dtype, device=device)
    pls = posterior_log_scale(code)
    {"z": z, "logits": lg, "means": mu, "log_scales": ls, "code": code, "posterior_log_scale": pls}[where][2, 3] = \
        math.nan
    with poisoned_outputs():
        kl_s = acn_kernels.acn_kl(z, code, lg, mu, ls, posterior_log_scale=pls, backend=backend).cpu()
        kl = acn_kernels.acn_kl(z, code, lg, mu, ls, backend=backend).cpu()
        pd = acn_kernels.mixture_log_prob(z, lg, mu, ls, per_dim=True, backend=backend).cpu()
    assert torch.isnan(kl_s[2]) and torch.isfinite(kl_s[[0, 1, 3]]).all()
    assert torch.isnan(kl[2]) == (where != "posterior_log_scale") and torch.isfinite(kl[[0, 1, 3]]).all()
    nan = torch.zeros(4, 6, dtype=torch.bool)
    nan[2, 3] = where not in ("code", "posterior_log_scale")
    assert torch.equal(torch.isnan(pd), nan) and torch.isfinite(pd[~nan]).all()


# ---------------------------------------------------------------------------------------------
# Layouts and sizes


@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_empty_and_non_contiguous(backend, device, dtype):
    """B = 0 gives an empty result; D = 0 the empty sum, 0 (every element written); inputs with
    any strides give the contiguous inputs' result (bit for bit on the compiled backends, which
    read them contiguous; within rounding on "torch", whose ops may sum in another order)."""
    z, lg, mu, ls, code = mixture_inputs(0, 4, 3, dtype=dtype, device=device)
    assert acn_kernels.mixture_log_prob(z, lg, mu, ls, backend=backend).shape == (0,)
    assert acn_kernels.acn_kl(z, code, lg, mu, ls, backend=backend).shape == (0,)
    z, lg, mu, ls, code = mixture_inputs(5, 0, 3, dtype=dtype, device=device)
    with poisoned_outputs():
        out = acn_kernels.mixture_log_prob(z, lg, mu, ls, backend=backend)
        kl = acn_kernels.acn_kl(z, code, lg, mu, ls, backend=backend)
    assert torch.equal(out.cpu(), torch.zeros(5, dtype=out.dtype)) and torch.equal(kl.cpu(), out.cpu())
    inputs = mixture_inputs(6, 8, 5, seed=29, dtype=dtype, device=device)
    z, lg, mu, ls, code = inputs
    strided = [z.t().contiguous().t(), lg.transpose(0, 1).contiguous().transpose(0, 1), mu[:, :, :],
               ls.transpose(1, 2).contiguous().transpose(1, 2), code.t().contiguous().t()]
    assert not any(t.is_contiguous() for i, t in enumerate(strided) if i != 2)
    for kind in MIXTURE_KINDS:
        with poisoned_outputs():
            got, got_grads = value_and_grads(mixture_op(kind, backend), op_inputs(kind, strided))
            want, want_grads = value_and_grads(mixture_op(kind, backend), op_inputs(kind, inputs))
        for g, w in zip((got, *got_grads), (want, *want_grads), strict=True):
            if backend == "torch":
                assert_close(g, w, rtol=RTOL[g.dtype], msg=kind)
            else:
                assert torch.equal(g, w), kind


@pytest.mark.parametrize("backend,device,dtype", GPU)
@pytest.mark.skipif(not FILL_GPU, reason="set ACN_TEST_FILL_GPU=1")
def test_fill_gpu(backend, device, dtype):
    inputs = mixture_inputs(65536, 64, 8, seed=4, dtype=dtype, device=device)
    check_mixture("log_prob", backend, inputs)


@pytest.mark.parametrize("backend,device,dtype", GPU)
def test_runs_on_the_current_stream(backend, device, dtype):
    """Inputs are written on a side stream behind a long sleep; the ops launched on that stream
    must see the written values (an op on the default stream would read the stale zeros)."""
    src = mixture_inputs(4, 8, 3, seed=1, device=device)
    want = [reference.mixture_log_prob(*src[:4]), reference.acn_kl(*op_inputs("acn_kl", src))]
    mix = [torch.zeros_like(t) for t in src]
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # about 20-50 ms of GPU time
        for dst, t in zip(mix, src, strict=True):
            dst.copy_(t)
        got = [acn_kernels.mixture_log_prob(*mix[:4], backend=backend),
               acn_kernels.acn_kl(*op_inputs("acn_kl", mix), backend=backend)]
    s.synchronize()
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, rtol=RTOL[dtype])


@pytest.mark.parametrize("backend,device,dtype", GPU)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device(backend, device, dtype):
    inputs = mixture_inputs(3, 4, 2, seed=2, device="cuda:1")
    out = acn_kernels.mixture_log_prob(*inputs[:4], backend=backend)
    assert out.device == inputs[0].device
    assert_close(out, reference.mixture_log_prob(*f64(inputs[:4])), rtol=RTOL[dtype])


# ---------------------------------------------------------------------------------------------
# Registration, compile, gradcheck


def _registered(backend: str):
    """(mixture_fwd, mixture_bwd) registered ops of a compiled backend (its Triton module imported)."""
    if backend == "triton":
        from acn_kernels.triton import mixture  # noqa: F401  (registers the ops)

        return torch.ops.acn_kernels.triton_mixture_fwd, torch.ops.acn_kernels.triton_mixture_bwd
    return torch.ops.acn_kernels.mixture_fwd, torch.ops.acn_kernels.mixture_bwd


@pytest.mark.parametrize("backend,device,dtype", params(OP, dtypes=[torch.float32, torch.float64],
                                                        backends=COMPILED))
def test_opcheck(backend, device, dtype):
    """Schema, fake kernels and autograd registration of both ops (torch.library.opcheck):
    log p, the KL with the unit posterior and with a posterior log-scale (also left out, the
    schema's default)."""
    fwd, bwd = _registered(backend)
    z, lg, mu, ls, code = mixture_inputs(4, 6, 3, seed=8, dtype=dtype, device=device)
    for c, p in ((None, None), (code, None), (code, posterior_log_scale(code))):
        for per_dim in (False, True):
            args = [t.clone().requires_grad_() for t in (z, lg, mu, ls)]
            c_in, p_in = (None if t is None else t.clone().requires_grad_() for t in (c, p))
            torch.library.opcheck(fwd, (*args, c_in, per_dim, p_in))
            if p is None:
                torch.library.opcheck(fwd, (*args, c_in, per_dim))
            out, lse = fwd(z, lg, mu, ls, c, per_dim, p)
            torch.library.opcheck(bwd, (torch.randn_like(out), z, lg, mu, ls, c, lse, per_dim, p))


@pytest.mark.parametrize("backend,device,dtype", params(OP, dtypes=[torch.float32], backends=COMPILED))
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(backend, device, dtype, dynamic):
    torch._dynamo.reset()

    def loss(z, code, lg, mu, ls):
        kl = acn_kernels.acn_kl(z, code, lg, mu, ls, backend=backend)
        kl_s = acn_kernels.acn_kl(z, code, lg, mu, ls, posterior_log_scale=ls[..., 0], backend=backend)
        lp = acn_kernels.mixture_log_prob(z, lg, mu, ls, per_dim=True, backend=backend)
        return kl.mean() + kl_s.mean() + lp.sum()

    compiled = torch.compile(loss, fullgraph=True, dynamic=dynamic)
    for b in (5, 8):
        args = op_inputs("acn_kl", mixture_inputs(b, 9, 3, seed=b, dtype=dtype, device=device))
        got, got_grads = value_and_grads(compiled, args)
        want, want_grads = value_and_grads(loss, args)
        torch.testing.assert_close(got, want)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend,device,dtype", params(OP, dtypes=[torch.float64]))
def test_gradcheck(backend, device, dtype):
    z, lg, mu, ls, code = (t.requires_grad_() for t in mixture_inputs(3, 5, 4, seed=2, dtype=dtype,
                                                                     device=device))
    assert torch.autograd.gradcheck(lambda *t: acn_kernels.acn_kl(*t, backend=backend), (z, code, lg, mu, ls))
    pls = posterior_log_scale(code.detach()).requires_grad_()
    assert torch.autograd.gradcheck(mixture_op("acn_kl_scale", backend), (z, code, lg, mu, ls, pls))
    assert torch.autograd.gradcheck(
        lambda *t: acn_kernels.mixture_log_prob(*t, per_dim=True, backend=backend), (z, lg, mu, ls))


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument


# (name, change of [z, logits, means, log_scales, code], exception, message); the first
# STRUCTURAL ones the registered ops check too.
BAD = [
    ("z rank", lambda a: a.__setitem__(0, a[0][0]), ValueError, "z must have shape"),
    ("logits rank", lambda a: a.__setitem__(1, a[1][0]), ValueError, "logits must have shape"),
    ("means shape", lambda a: a.__setitem__(2, a[2][:, :2]), ValueError, "means has shape"),
    ("components", lambda a: a.__setitem__(3, a[3][..., :2]), ValueError, "log_scales has 2 components"),
    ("dtype", lambda a: a.__setitem__(3, a[3].double()), TypeError, "log_scales has dtype"),
    ("int z", lambda a: a.__setitem__(0, a[0].long()), TypeError, "z must be a floating-point"),
    ("code shape", lambda a: a.__setitem__(4, a[4][:1]), ValueError, "code has shape"),
]
STRUCTURAL = len(BAD)
BAD += [
    ("device", lambda a: a.__setitem__(2, a[2].to("meta")), ValueError, "means is on meta"),
    ("M = 0", lambda a: a.__setitem__(1, a[1][..., :0]), ValueError, "at least one component"),
]


def _bad_args(change, device):
    args = [t.to(device) for t in mixture_inputs(2, 3, 4)]
    change(args)
    return args


@pytest.mark.parametrize("backend,device,dtype", F32)
@pytest.mark.parametrize("name,change,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, device, dtype, name, change, exc, match):
    """The public functions: a TypeError / ValueError naming the argument, on every backend (the
    checks run before dispatch)."""
    z, lg, mu, ls, code = _bad_args(change, device)
    with pytest.raises(exc, match=match):
        acn_kernels.acn_kl(z, code, lg, mu, ls, backend=backend)
    if name != "code shape":
        with pytest.raises(exc, match=match):
            acn_kernels.mixture_log_prob(z, lg, mu, ls, backend=backend)


@pytest.mark.parametrize("backend,device,dtype", params(OP, dtypes=[torch.float32], backends=COMPILED))
@pytest.mark.parametrize("name,change,exc,match", BAD[:STRUCTURAL], ids=[b[0] for b in BAD[:STRUCTURAL]])
def test_bad_input_registered_op(backend, device, dtype, name, change, exc, match):
    """The registered forward is callable directly and checks the structure itself, naming the
    argument: RuntimeError from the C++ op (csrc/checks.cpp), the Python check's error from the
    Triton op."""
    z, lg, mu, ls, code = _bad_args(change, device)
    if backend in ("cpu", "cuda"):
        exc = RuntimeError
    with pytest.raises(exc, match=match):
        _registered(backend)[0](z, lg, mu, ls, code, False)


@pytest.mark.parametrize("backend,device,dtype", params(OP, dtypes=[torch.float32], backends=COMPILED))
def test_bad_saved_state_registered_backward(backend, device, dtype):
    """The registered backward checks the shapes of grad_out and of the saved log-sum-exps."""
    fwd, bwd = _registered(backend)
    z, lg, mu, ls, _ = mixture_inputs(2, 3, 2, device=device)
    out, lse = fwd(z, lg, mu, ls, None, False)
    with pytest.raises((ValueError, RuntimeError), match="grad_out"):
        bwd(torch.ones(3, device=device), z, lg, mu, ls, None, lse, False)
    with pytest.raises((ValueError, RuntimeError), match="lse"):
        bwd(torch.ones_like(out), z, lg, mu, ls, None, lse[:, :1], False)


@pytest.mark.parametrize("backend,dtype", unsupported_params())
def test_unsupported_dtype_names_every_backend(backend, dtype):
    """An explicit backend that cannot take the dtype raises one error listing every backend
    with its reasons (the capability table), before any kernel runs."""
    z, lg, mu, ls, code = mixture_inputs(2, 3, 2, dtype=dtype)
    with pytest.raises(RuntimeError, match=f"backend='{backend}' cannot run.*{str(dtype)[6:]}") as e:
        acn_kernels.mixture_log_prob(z, lg, mu, ls, backend=backend)
    for name in acn_kernels.dispatch.BACKENDS:
        assert f"{name}: " in str(e.value)


# ---------------------------------------------------------------------------------------------
# Issue 16 (reliability)


def large_logit_inputs(b, d, m, kind, scale, *, dtype, device, seed=0):
    """make_inputs with logits far from the origin, drawn in float64 and rounded to ``dtype``.

    kind "scaled": logits * scale (differences of the size of the logits: one-hot weights);
    "offset": a per-row offset of about +-scale plus O(1) differences (distinct weights where the
    dtype resolves them, ties where it rounds them away); "ulps": per-row offsets of about +-scale
    with components a few float32 ulps apart (ties and near-ties).
    """
    z, lg, mu, ls, code = mixture_inputs(b, d, m, seed=seed, dtype=torch.float64)
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


# (backend, device, dtype) at float32 and float64, where the backend takes it.
BACKEND_DTYPES = params(OP, dtypes=[torch.float32, torch.float64])
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-4, atol=2e-4)}


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
                out, grads = value_and_grads(lambda *t: acn_kernels.mixture_log_prob(*t, backend=backend), ins)
                kl = acn_kernels.acn_kl(z, code, lg, mu, ls, backend=backend)
            ref_in = [t.double().cpu() for t in ins]
            want, want_grads = value_and_grads(reference.mixture_log_prob, ref_in)
            z64, lg64, mu64, ls64 = ref_in
            msf = msf_log_prob(z64, lg64 - lg64.amax(-1, keepdim=True), mu64, ls64)
            ctx = f"{kind} scale={scale:g} M={m}"
            t = TOL[dtype]
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
    z, lg, mu, ls, _ = mixture_inputs(3, 18, 4, seed=21, dtype=dtype, device=device)
    z[0, 2], z[2, 17] = math.inf, -math.inf
    with poisoned_outputs():
        out, grads = value_and_grads(lambda *t: acn_kernels.mixture_log_prob(*t, per_dim=True, backend=backend),
                               [z, lg, mu, ls])
    out, grads = out.cpu(), [g.cpu() for g in grads]
    dead = torch.zeros(3, 18, dtype=torch.bool)
    dead[0, 2] = dead[2, 17] = True
    assert (out[dead] == -math.inf).all()
    for g in grads:
        assert (g[dead] == 0).all() and torch.isfinite(g).all()
    live_in = [t.double().cpu() for t in (z, lg, mu, ls)]
    live_in[0] = torch.where(dead, 0.0, live_in[0])
    want, want_grads = value_and_grads(lambda *t: reference.mixture_log_prob(*t, per_dim=True), live_in)
    t = TOL[dtype]
    torch.testing.assert_close(out[~dead].double(), want[~dead], **t)
    for g, w in zip(grads, want_grads, strict=True):
        scl = w.abs().max().item() + 1.0
        torch.testing.assert_close(g[~dead].double(), w[~dead], rtol=t["rtol"] * 10, atol=t["atol"] * scl)


@pytest.mark.parametrize("backend,device", [pytest.param(*p.values[:2], id=p.id, marks=p.marks) for p in F32])
def test_issue16_double_backward_raises_or_is_exact(backend, device):
    """A gradient of a gradient through the fused ops: the compiled backends raise a clear error
    (PyTorch only warned and returned zeros); the torch backend differentiates twice."""
    z, lg, mu, ls, code = mixture_inputs(3, 5, 4, seed=31, device=device,
                                         dtype=torch.float32 if backend in ("triton", "cuda") else torch.float64)
    leaves = [t.requires_grad_() for t in (z, code, lg, mu, ls)]
    kl = acn_kernels.acn_kl(*leaves, backend=backend)
    (gz,) = torch.autograd.grad(kl.sum(), leaves[0], create_graph=True)
    if backend != "torch":
        with pytest.raises(RuntimeError, match="double backward"):
            gz.square().sum().backward()
        return
    assert torch.autograd.gradgradcheck(lambda *t: acn_kernels.acn_kl(*t, backend="torch"), leaves)


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("kind", MIXTURE_KINDS)
@pytest.mark.parametrize("d", [0, 1, 3, 15, 17, 24, 25])
def test_issue16_blocks_across_rows(backend, device, dtype, kind, d):
    """The CPU kernel's 16-element blocks run across row boundaries (a per-row split left
    D % 16 lanes idle in every row): every D below, at and off a multiple of 16, row sums and
    per-dimension values, forward and every gradient, with M inside (2, 8) and outside (17)
    the flat-layout range."""
    for m in (2, 8, 17):
        check_mixture(kind, backend, mixture_inputs(5, d, m, seed=d * 10 + m, dtype=dtype, device=device))


# ---------------------------------------------------------------------------------------------
# Issue 13: one Gaussian per dimension (as_mixture) and its closed-form KL (gaussian_kl)


BACKENDS = backend_params(include_torch=True, op=OP)


def tol(dtype: torch.dtype) -> dict[str, float]:
    """Absolute-and-relative tolerances of the Issue 13 checks, by the compared dtype."""
    return {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-4, atol=2e-4),
            torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}[dtype]


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
    got_v, got_g = value_and_grads(lambda *t: acn_kernels.gaussian_kl(*t[:3], posterior_log_scale=t[3]),
                             [code, mean, lp, lq])
    want_v, want_g = value_and_grads(normal_kl_oracle, [code, mean, lp, lq])
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
        got, got_g = value_and_grads(fused, [t.to(dtype=dt, device=device) for t in (z, code, mean, lp)])
    want, want_g = value_and_grads(oracle, [z, code, mean, lp])
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
    z, lg, mu, ls, code = mixture_inputs(b, d, m, seed=seed, dtype=torch.float64)
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
@pytest.mark.parametrize("case", ["plain", "far", "scales", "extreme"])
def test_posterior_log_scale_vs_reference(backend, device, case):
    """Forward and all six gradients against the float64 reference, with poisoned outputs; far
    from the origin (1e3) and at huge and tiny posterior scales (log-scales in [-8, 8], and in
    [-30, 30]: scales from 1e-13 to 1e13, terms up to 1e26)."""
    offset, lo, hi = {"plain": (0.0, -2.0, 2.0), "far": (1e3, -2.0, 2.0), "scales": (0.0, -8.0, 8.0),
                      "extreme": (0.0, -30.0, 30.0)}[case]
    dtype = torch.float32 if backend == "triton" else torch.float64
    for dt in sorted({dtype, torch.float32}, key=str):
        inputs = posterior_inputs(5, 19, 3, dtype=dt, device=device, seed=7, offset=offset, pls_lo=lo, pls_hi=hi)
        with poisoned_outputs():
            got, got_g = value_and_grads(_kl_with_scale(backend), inputs)
        want, want_g = value_and_grads(reference.acn_kl, [t.double().cpu() for t in inputs])
        assert got.dtype == reference.acc_dtype(dt) and got.shape == (5,)
        assert torch.isfinite(want).all()
        t = tol(dt)
        # Terms of size up to exp(16) * z^2: compare relative to each result's magnitude.
        torch.testing.assert_close(got.cpu().double(), want, rtol=t["rtol"] * 10,
                                   atol=t["atol"] * (want.abs().max().item() + 1))
        for g_, w in zip(got_g, want_g, strict=True):
            torch.testing.assert_close(g_.cpu().double(), w, rtol=t["rtol"] * 10,
                                       atol=t["atol"] * (w.abs().max().item() + 1))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_posterior_log_scale_matches_torch_distributions(backend, device):
    """The independent oracle, Normal(code, exp(posterior_log_scale)).log_prob minus
    MixtureSameFamily's, forward and all six gradients (float64 where the backend takes it)."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    inputs = posterior_inputs(6, 11, 4, dtype=dtype, device=device, seed=3)
    with poisoned_outputs():
        got, got_g = value_and_grads(_kl_with_scale(backend), inputs)
    want, want_g = value_and_grads(posterior_oracle, f64(inputs))
    t = tol(dtype)
    torch.testing.assert_close(got.cpu().double(), want, rtol=t["rtol"], atol=t["atol"] * (want.abs().max().item() + 1))
    for g_, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g_.cpu().double(), w, rtol=t["rtol"], atol=t["atol"] * (w.abs().max().item() + 1))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_posterior_log_scale_is_the_unit_posterior(backend, device):
    """A zero log-scale is the unit posterior: bit for bit where the arithmetic is not contracted
    into FMAs (the Triton interpreter), within rounding elsewhere; and d KL / d log s_q = v^2 - 1
    per dimension, v = z - code."""
    dt = torch.float32
    z, code, lg, mu, ls, _ = posterior_inputs(4, 9, 2, dtype=dt, device=device, seed=5)
    plain, plain_g = value_and_grads(lambda *t: acn_kernels.acn_kl(*t, backend=backend), [z, code, lg, mu, ls])
    zero = torch.zeros_like(z)
    scaled, scaled_g = value_and_grads(_kl_with_scale(backend), [z, code, lg, mu, ls, zero])
    if interpreted(backend, device):
        assert torch.equal(scaled, plain) and all(torch.equal(a, b) for a, b in zip(scaled_g[:5], plain_g, strict=True))
    torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=1e-5)
    for g_, w in zip(scaled_g[:5], plain_g, strict=True):
        torch.testing.assert_close(g_, w, rtol=1e-6, atol=1e-6)
    v = (z - code).double()
    g = torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    torch.testing.assert_close(scaled_g[5].double(), (v * v - 1) * g[:, None], rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("backend,device", backend_params(op=OP))
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


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_posterior_log_scale_non_finite(backend, device):
    """Non-finite posterior inputs give what the reference gives in the result dtype, exactly
    (values and gradients): a log-scale of +inf gives log q = -inf (KL -inf, finite gradients),
    -inf and z = inf give NaN (-inf - -inf), a tiny scale whose v^2 overflows gives KL -inf; the
    other rows keep their values and gradients."""
    z, code, lg, mu, ls, pls = posterior_inputs(6, 5, 3, dtype=torch.float32, device=device, seed=9)
    pls[0, 1] = math.inf
    pls[1, 2] = -math.inf
    z[2, 3] = math.inf
    pls[3, 0] = -60.0  # exp(60) (z - code) ~ 1e26: v^2 overflows float32
    z[3, 0] = code[3, 0] + 1.0
    inputs = [z, code, lg, mu, ls, pls]
    with poisoned_outputs():
        got, got_g = value_and_grads(_kl_with_scale(backend), inputs)
    want, want_g = value_and_grads(reference.acn_kl, [t.cpu() for t in inputs])  # float32, as the kernels
    assert got[0] == -math.inf and got[3] == -math.inf and got[1:3].isnan().all() and got[4:].isfinite().all()
    assert_close(got, want, rtol=RTOL[torch.float32], msg="value")
    for name, g_, w in zip(("dz", "dcode", "dlogits", "dmeans", "dlog_scales", "dpls"), got_g, want_g, strict=True):
        assert_close(g_, w, rtol=2 * RTOL[torch.float32], scale=row_scale(w.nan_to_num(0.0, 0.0, 0.0)), msg=name)
    assert torch.isfinite(got_g[5][0]).all() and got_g[5][0, 1] != 0


@pytest.mark.parametrize("backend,device", backend_params(op=OP))
def test_posterior_log_scale_registered_ops(backend, device):
    """The log-scale path is the registered op itself: acn_kl's result comes out of the fused
    forward (not a subtraction in PyTorch) and its six gradients out of one fused backward call;
    the registered forward, called directly, checks the log-scale (naming it) and requires code."""
    fwd, bwd = _registered(backend)
    z, code, lg, mu, ls, pls = posterior_inputs(3, 7, 2, dtype=torch.float32, device=device, seed=2)
    leaves = [t.clone().requires_grad_() for t in (z, code, lg, mu, ls, pls)]
    out = acn_kernels.acn_kl(*leaves[:5], posterior_log_scale=leaves[5], backend=backend)
    assert "Sub" not in out.grad_fn.name() and "mixture" in out.grad_fn.name().lower(), out.grad_fn.name()
    fused, lse = fwd(z, lg, mu, ls, code, False, pls)
    assert torch.equal(out.detach(), fused)
    g = torch.randn(3, device=device)
    grads = bwd(g, z, lg, mu, ls, code, lse, False, pls)
    want = torch.autograd.grad(out, leaves, g)
    # bwd returns (dz, dlogits, dmeans, dlog_scales, dcode, dpls); the leaves are (z, code, ...).
    for got_g, w in zip([grads[i] for i in (0, 4, 1, 2, 3, 5)], want, strict=True):
        assert torch.equal(got_g, w)
    exc = RuntimeError if backend in ("cpu", "cuda") else (TypeError, ValueError)
    for args, pattern in [((z, lg, mu, ls, code, False, pls[:2]), "posterior_log_scale has shape"),
                          ((z, lg, mu, ls, code, False, pls.double()), "posterior_log_scale has dtype"),
                          ((z, lg, mu, ls, None, False, pls), "code must be a")]:
        with pytest.raises(exc, match=pattern):
            fwd(*args)
