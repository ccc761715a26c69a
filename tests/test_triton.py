"""The Triton backend (acn_kernels/triton/mixture.py, masked_topk.py) against the float64 reference
and torch.distributions.MixtureSameFamily: forward, every gradient, edge cases, poisoned outputs,
opcheck of the custom ops and torch.compile of the public functions.

Runs on a GPU, or on CPU tensors in a process started with TRITON_INTERPRET=1 (the variable must be
set before the kernels are defined): ``TRITON_INTERPRET=1 pytest -m triton``. Elsewhere every test
is skipped. Shapes are small and chosen to cross the block sizes of both launchers: under the
interpreter each program costs about a millisecond of Python.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from testing import HAS_GPU, INTERPRET, poisoned_outputs

import acn_kernels
from acn_kernels import MAX_K, reference

_AVAILABLE = acn_kernels.backends()["triton"]
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not _AVAILABLE, reason="the triton backend needs a GPU or TRITON_INTERPRET=1"),
    # The interpreter evaluates masked-off lanes too (e.g. -inf - -inf); numpy warns about them.
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]

DEVICE = "cuda" if HAS_GPU and not INTERPRET else "cpu"
FLT_MAX = torch.finfo(torch.float32).max
BE = "triton"


@pytest.fixture(autouse=True)
def _no_poison_leak():
    yield
    from acn_kernels import _testing

    assert not _testing.POISON


# ---------------------------------------------------------------------------------------------
# Mixture helpers


def mixture_inputs(b, d, m, *, seed, dtype=torch.float32, ls_range=(-2.0, 1.0), logit_scale=2.0):
    """(z, logits, means, log_scales, code) on DEVICE, drawn in float64 and rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=g, dtype=torch.float64) * 2
    logits = torch.randn(b, d, m, generator=g, dtype=torch.float64) * logit_scale
    means = torch.randn(b, d, m, generator=g, dtype=torch.float64) * 2
    log_scales = torch.empty(b, d, m, dtype=torch.float64).uniform_(*ls_range, generator=g)
    code = torch.randn(b, d, generator=g, dtype=torch.float64)
    return [t.to(dtype=dtype, device=DEVICE) for t in (z, logits, means, log_scales, code)]


def value_and_grads(fn, inputs, seed=1):
    """fn(*inputs) and the gradients of <fn, g> for a random g, inputs as fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, g.to(dtype=out.dtype, device=out.device))
    return out.detach(), grads


def f64(ts):
    return [t.detach().cpu().double() for t in ts]


def kernel_and_reference(kind, inputs, per_dim=False):
    """(out, grads) of the Triton op with poisoned outputs, and of the float64 reference on the
    same (rounded) inputs. kind "lp": mixture_log_prob(z, logits, means, log_scales); "kl":
    acn_kl(z, code, logits, means, log_scales)."""
    if kind == "lp":
        def tri(*t):
            return acn_kernels.mixture_log_prob(*t, per_dim=per_dim, backend=BE)

        def ref(*t):
            return reference.mixture_log_prob(*t, per_dim=per_dim)
    else:
        def tri(*t):
            return acn_kernels.acn_kl(*t, backend=BE)

        ref = reference.acn_kl
    with poisoned_outputs():
        got = value_and_grads(tri, inputs)
    return got, value_and_grads(ref, f64(inputs))


def assert_close_f64(got, want, rtol, atol):
    torch.testing.assert_close(got.detach().cpu().double(), want, rtol=rtol, atol=atol, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Mixture against the reference


# M from 1 to 16 (and 67 > the interpreter's block of 64 components, for the online log-sum-exp
# across chunks); D across the 64-wide (interpreter) and 32-wide (GPU) dimension blocks.
SHAPES = [(1, 1, 1), (3, 5, 2), (7, 37, 5), (5, 70, 16), (33, 3, 9), (2, 9, 7), (4, 6, 67), (130, 2, 3)]


@pytest.mark.parametrize("b,d,m", SHAPES)
@pytest.mark.parametrize("per_dim", [False, True])
def test_mixture_log_prob_vs_reference(b, d, m, per_dim):
    z, lg, mu, ls, _ = mixture_inputs(b, d, m, seed=b * 1000 + d * 10 + m)
    (out, grads), (ref, ref_grads) = kernel_and_reference("lp", [z, lg, mu, ls], per_dim)
    assert out.dtype == torch.float32 and out.shape == ((b, d) if per_dim else (b,))
    assert_close_f64(out, ref, rtol=1e-5, atol=2e-5 * (1 if per_dim else d))
    for name, got, want in zip(("dz", "dlogits", "dmeans", "dlog_scales"), grads, ref_grads, strict=True):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert_close_f64(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("b,d,m", [(1, 1, 1), (6, 11, 4), (9, 67, 16), (40, 3, 2)])
def test_acn_kl_vs_reference(b, d, m):
    z, lg, mu, ls, code = mixture_inputs(b, d, m, seed=7 + m)
    (out, grads), (ref, ref_grads) = kernel_and_reference("kl", [z, code, lg, mu, ls])
    assert out.shape == (b,) and out.dtype == torch.float32
    assert_close_f64(out, ref, rtol=1e-5, atol=2e-5 * d)
    for name, got, want in zip(("dz", "dcode", "dlogits", "dmeans", "dlog_scales"), grads, ref_grads,
                               strict=True):
        assert_close_f64(got, want, rtol=1e-4, atol=1e-5), name


@given(b=st.integers(1, 40), d=st.integers(1, 40), m=st.integers(1, 16), per_dim=st.booleans(),
       kl=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_mixture_property(b, d, m, per_dim, kl, seed):
    """Fresh random shapes and values (hypothesis "ci" profile): forward and every gradient."""
    z, lg, mu, ls, code = mixture_inputs(b, d, m, seed=seed, ls_range=(-4.0, 3.0), logit_scale=5.0)
    if kl:
        (out, grads), (ref, ref_grads) = kernel_and_reference("kl", [z, code, lg, mu, ls])
    else:
        (out, grads), (ref, ref_grads) = kernel_and_reference("lp", [z, lg, mu, ls], per_dim)
    assert_close_f64(out, ref, rtol=1e-5, atol=5e-5 * d)
    for got, want in zip(grads, ref_grads, strict=True):
        scale = want.abs().amax().clamp_min(1.0)
        assert_close_f64(got / scale, want / scale, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("b,d,m", [(5, 40, 17), (9, 3, 2), (3, 70, 33)])
def test_mixture_gpu_blocks(monkeypatch, b, d, m):
    """The GPU block sizes (32 dimensions by 16 components, so several chunks of each), run under
    the interpreter too."""
    from acn_kernels.triton import mixture as triton_mixture

    if INTERPRET:
        real = triton_mixture._blocks
        monkeypatch.setattr(triton_mixture, "_blocks", lambda D, M, interpret: real(D, M, False))
    z, lg, mu, ls, code = mixture_inputs(b, d, m, seed=m)
    for kind, ins, per_dim in (("lp", [z, lg, mu, ls], True), ("lp", [z, lg, mu, ls], False),
                               ("kl", [z, code, lg, mu, ls], False)):
        (out, grads), (ref, ref_grads) = kernel_and_reference(kind, ins, per_dim)
        assert_close_f64(out, ref, rtol=1e-5, atol=2e-5 * d)
        for got, want in zip(grads, ref_grads, strict=True):
            assert_close_f64(got, want, rtol=1e-4, atol=1e-5)


def test_mixture_vs_mixture_same_family():
    """The independent oracle: torch.distributions.MixtureSameFamily, forward and gradients."""

    def msf(z, lg, mu, ls):
        mix = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(logits=lg), torch.distributions.Normal(mu, ls.exp())
        )
        return mix.log_prob(z).sum(-1)

    ins = mixture_inputs(9, 21, 6, seed=5)[:4]
    with poisoned_outputs():
        out, grads = value_and_grads(lambda *t: acn_kernels.mixture_log_prob(*t, backend=BE), ins)
    want, want_grads = value_and_grads(msf, f64(ins))
    assert_close_f64(out, want, rtol=1e-5, atol=1e-4)
    for got, w in zip(grads, want_grads, strict=True):
        assert_close_f64(got, w, rtol=1e-4, atol=1e-5)


def test_mixture_extreme_parameters():
    """Large and tiny scales, very negative logits: finite, and equal to the reference."""
    z, lg, mu, ls, code = mixture_inputs(6, 13, 5, seed=11)
    ls[0] = -12.0  # sigma 6e-6: huge |u|, a sharply peaked density
    ls[1] = 25.0  # sigma 7e10
    lg[2, :, 0] = -1e4  # a practically absent component
    lg[3] = -80.0  # every logit very negative (log-softmax must be shift-invariant)
    lg[3, :, 1] = -85.0
    mu[4] = z[4].unsqueeze(-1) + 1e-3  # z right at the means
    ls[4] = -6.0
    ls[5, :, :2] = -30.0  # two components of negligible density next to ordinary ones
    for kind, ins in (("lp", [z, lg, mu, ls]), ("kl", [z, code, lg, mu, ls])):
        (out, grads), (ref, ref_grads) = kernel_and_reference(kind, ins)
        assert torch.isfinite(out).all()
        assert_close_f64(out, ref, rtol=1e-5, atol=1e-3)
        for got, want in zip(grads, ref_grads, strict=True):
            assert torch.isfinite(got).all()
            scale = want.abs().amax().clamp_min(1.0)
            assert_close_f64(got / scale, want / scale, rtol=1e-4, atol=1e-5)


def test_mixture_dead_dimension_gives_minus_inf_and_zero_grads():
    """A dimension whose every term is -inf in float32 (every component far away with a tiny
    scale; the float64 value, about -1e69, is not representable): -inf, not NaN, with zero
    gradients, as the float32 reference gives; the other rows are unaffected."""
    z, lg, mu, ls, code = mixture_inputs(4, 7, 3, seed=13)
    mu[1, 2] = z[1, 2] + 1.0
    ls[1, 2] = -80.0  # u = 1 / exp(-80) overflows float32: every term is -inf
    for per_dim in (False, True):
        (out, grads), (ref, _) = kernel_and_reference("lp", [z, lg, mu, ls], per_dim)
        dead = (1, 2) if per_dim else (1,)
        ref32 = reference.mixture_log_prob(z, lg, mu, ls, per_dim=per_dim).cpu()
        assert out[dead] == -math.inf and ref32[dead] == -math.inf and ref[dead] < -FLT_MAX
        live = torch.ones(out.shape, dtype=torch.bool)
        live[dead] = False
        assert_close_f64(out[live], ref[live], rtol=1e-5, atol=1e-4)
        for g in grads:
            assert torch.isfinite(g).all()
        assert grads[0][1, 2] == 0
        for g in grads[1:]:
            assert (g[1, 2] == 0).all()
    (out, grads), _ = kernel_and_reference("kl", [z, code, lg, mu, ls])
    assert out[1] == math.inf and torch.isfinite(out[[0, 2, 3]]).all()
    assert all((g[1, 2] == 0).all() for g in grads[2:])
    # dz and dcode there come from log N(z; code, I) alone
    assert grads[1][1, 2] != 0 and grads[0][1, 2] == -grads[1][1, 2]


def test_mixture_zero_weight_component_gets_zero_gradients():
    z, lg, mu, ls, _ = mixture_inputs(5, 8, 4, seed=17)
    lg[:, :, 2] = -math.inf
    ls[:, :, 2] = -60.0  # would give inf * 0 = NaN without the r == 0 rule
    (out, grads), (ref, ref_grads) = kernel_and_reference("lp", [z, lg, mu, ls])
    assert_close_f64(out, ref, rtol=1e-5, atol=1e-4)
    _, dlg, dmu, dls = grads
    assert (dmu[:, :, 2] == 0).all() and (dls[:, :, 2] == 0).all() and (dlg[:, :, 2] == 0).all()
    for got, want in zip(grads, ref_grads, strict=True):
        assert_close_f64(got, want.nan_to_num(0.0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where", ["z", "logits", "means", "log_scales", "code"])
def test_mixture_nan_in_nan_out(where):
    z, lg, mu, ls, code = mixture_inputs(4, 6, 3, seed=19)
    ins = {"z": z, "logits": lg, "means": mu, "log_scales": ls, "code": code}
    t = ins[where]
    t[2, 3] = math.nan
    kl = acn_kernels.acn_kl(z, code, lg, mu, ls, backend=BE)
    assert torch.isnan(kl[2]) and torch.isfinite(kl[[0, 1, 3]]).all()
    if where != "code":
        pd = acn_kernels.mixture_log_prob(z, lg, mu, ls, per_dim=True, backend=BE)
        assert torch.isnan(pd[2, 3])
        pd[2, 3] = 0.0
        assert torch.isfinite(pd).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixture_half_precision_inputs(dtype):
    """Half inputs are widened on load: float32 result equal to the reference on the same rounded
    inputs; gradients in the input dtype."""
    for kind in ("lp", "kl"):
        z, lg, mu, ls, code = mixture_inputs(6, 19, 5, seed=23, dtype=dtype)
        ins = [z, lg, mu, ls] if kind == "lp" else [z, code, lg, mu, ls]
        (out, grads), (ref, ref_grads) = kernel_and_reference(kind, ins)
        assert out.dtype == torch.float32
        assert_close_f64(out, ref, rtol=1e-5, atol=1e-3)
        for got, want in zip(grads, ref_grads, strict=True):
            assert got.dtype == dtype
            rt = 1e-2 if dtype == torch.float16 else 2e-2
            assert_close_f64(got, want, rtol=rt, atol=rt * want.abs().amax().item())


def test_mixture_rejects_float64_and_bad_input():
    z, lg, mu, ls, code = (t.double() for t in mixture_inputs(2, 3, 2, seed=0))
    with pytest.raises(RuntimeError, match="float64"):
        acn_kernels.mixture_log_prob(z, lg, mu, ls, backend=BE)
    with pytest.raises(TypeError, match="float64"):
        torch.ops.acn_kernels.triton_mixture_fwd(z, lg, mu, ls, code, False)
    z, lg, mu, ls, code = mixture_inputs(2, 3, 2, seed=0)
    with pytest.raises((ValueError, RuntimeError), match="means"):
        torch.ops.acn_kernels.triton_mixture_fwd(z, lg, mu[:, :2], ls, None, False)
    out, lse = torch.ops.acn_kernels.triton_mixture_fwd(z, lg, mu, ls, None, False)
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.acn_kernels.triton_mixture_bwd(torch.ones(3, device=DEVICE), z, lg, mu, ls, None, lse,
                                                 False)


def test_mixture_empty_and_non_contiguous():
    z, lg, mu, ls, _ = mixture_inputs(0, 4, 3, seed=0)
    assert acn_kernels.mixture_log_prob(z, lg, mu, ls, backend=BE).shape == (0,)
    z, lg, mu, ls, _ = mixture_inputs(5, 0, 3, seed=0)
    with poisoned_outputs():
        out = acn_kernels.mixture_log_prob(z, lg, mu, ls, backend=BE)
    assert torch.equal(out.cpu(), torch.zeros(5))  # the empty sum
    z, lg, mu, ls, _ = mixture_inputs(6, 8, 5, seed=29)
    zt, lgt = z.t().contiguous().t(), lg.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (zt.is_contiguous() or lgt.is_contiguous())
    torch.testing.assert_close(acn_kernels.mixture_log_prob(zt, lgt, mu[:, :, :], ls, backend=BE),
                               acn_kernels.mixture_log_prob(z, lg, mu, ls, backend=BE))


def test_mixture_opcheck():
    z, lg, mu, ls, code = mixture_inputs(4, 6, 3, seed=8)
    for c in (None, code):
        for per_dim in (False, True):
            args = tuple(t.clone().requires_grad_() for t in (z, lg, mu, ls))
            c_in = None if c is None else c.clone().requires_grad_()
            torch.library.opcheck(torch.ops.acn_kernels.triton_mixture_fwd, (*args, c_in, per_dim))
            out, lse = torch.ops.acn_kernels.triton_mixture_fwd(z, lg, mu, ls, c, per_dim)
            torch.library.opcheck(torch.ops.acn_kernels.triton_mixture_bwd,
                                  (torch.randn_like(out), z, lg, mu, ls, c, lse, per_dim))


def test_mixture_torch_compile_fullgraph():
    torch._dynamo.reset()

    def loss(z, lg, mu, ls, code):
        kl = acn_kernels.acn_kl(z, code, lg, mu, ls, backend=BE)
        lp = acn_kernels.mixture_log_prob(z, lg, mu, ls, per_dim=True, backend=BE)
        return kl.mean() + lp.sum()

    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    for b in (5, 8):
        ins = mixture_inputs(b, 9, 3, seed=b)
        got, got_grads = value_and_grads(compiled, ins)
        want, want_grads = value_and_grads(loss, ins)
        torch.testing.assert_close(got, want)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------------------------
# masked_topk helpers


def grid_data(n, d, *, seed, dtype=torch.float32, levels=9):
    """Half-integers in [-2, 2]: squared distances are exact in every dtype and in the direct and
    expanded forms alike, so results must equal the reference bit for bit, ties included."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, levels, (n, d), generator=g) - levels // 2).double() / 2
    return x.to(dtype=dtype, device=DEVICE)


def topk(q, bank, k, mask=None, excl=None):
    with poisoned_outputs():
        d, i = acn_kernels.masked_topk(q, bank, k, exclude_mask=mask, exclude_index=excl, backend=BE)
    assert d.dtype == torch.float32 and i.dtype == torch.int64 and d.shape == i.shape == (q.shape[0], k)
    return d.cpu(), i.cpu()


def ref_topk(q, bank, k, mask=None, excl=None):
    return reference.masked_topk(q.cpu().double(), bank.cpu().double(), k,
                                 None if mask is None else mask.cpu(), None if excl is None else excl.cpu())


def assert_exact(got, want):
    (d, i), (rd, ri) = got, want
    assert torch.equal(i, ri), "rows differ"
    assert torch.equal(d.double(), rd), "dists differ"


def assert_selection_close(got, want, q, bank):
    """Random data: dists equal within a norm-scaled tolerance; rows equal wherever the reference
    distance is clear of its neighbours (no near-tie the expanded form may order otherwise)."""
    (d, i), (rd, ri) = got, want
    assert torch.equal(i < 0, ri < 0)
    scale = q.double().cpu().square().sum(1, keepdim=True) + bank.double().cpu().square().sum(1).max()
    tol = 4e-7 * scale + 1e-6
    fin = ri >= 0
    assert ((d.double() - rd).abs() <= tol)[fin].all()
    r = rd.nan_to_num(posinf=1e300)
    lo = torch.cat([torch.full_like(r[:, :1], math.inf), r.diff(dim=1)], 1)
    hi = torch.cat([r.diff(dim=1), torch.full_like(r[:, :1], math.inf)], 1)
    clear = fin & (lo > 2 * tol) & (hi > 2 * tol)
    assert torch.equal(i[clear], ri[clear])


# ---------------------------------------------------------------------------------------------
# masked_topk against the reference


# Under the interpreter a tile is up to 256 rows and a block 64 queries; N > 256 also runs the
# split-and-merge path. On a GPU tiles are max(64, next_pow2(k)) rows.
TOPK_CASES = [(1, 1, 1, 1), (3, 10, 4, 3), (5, 37, 3, 37), (17, 301, 16, 5), (70, 530, 33, 40),
              (2, 900, 7, 100), (9, 260, 70, 17)]


@pytest.mark.parametrize("b,n,d,k", TOPK_CASES)
def test_topk_grid_data_exact(b, n, d, k):
    q, bank = grid_data(b, d, seed=b), grid_data(n, d, seed=n)
    assert_exact(topk(q, bank, k), ref_topk(q, bank, k))


@pytest.mark.parametrize("b,n,d,k", TOPK_CASES)
def test_topk_masked_and_excluded(b, n, d, k):
    """Masks that leave fewer than k rows for some queries, exclude_index including -1."""
    g = torch.Generator().manual_seed(n + k)
    q, bank = grid_data(b, d, seed=b + 1), grid_data(n, d, seed=n + 1)
    mask = (torch.rand(n, generator=g) < 0.6).to(DEVICE)
    excl = torch.randint(-1, n, (b,), generator=g).to(DEVICE)
    got = topk(q, bank, k, mask, excl)
    assert_exact(got, ref_topk(q, bank, k, mask, excl))
    if int((~mask).sum()) < k:
        assert (got[1] == -1).any()


@pytest.mark.parametrize("b,n,d,k", [(4, 50, 5, 7), (33, 700, 19, 12), (3, 300, 40, 64)])
def test_topk_random_vs_reference(b, n, d, k):
    g = torch.Generator().manual_seed(b * n)
    q, bank = torch.randn(b, d, generator=g).to(DEVICE), torch.randn(n, d, generator=g).to(DEVICE)
    mask = (torch.rand(n, generator=g) < 0.3).to(DEVICE)
    assert_selection_close(topk(q, bank, k, mask), ref_topk(q, bank, k, mask), q, bank)


@pytest.mark.parametrize("b,n,d,k", [(17, 301, 16, 5), (3, 900, 7, 100), (20, 130, 33, 64), (2, 300, 5, 300)])
def test_topk_gpu_configuration(monkeypatch, b, n, d, k):
    """The GPU launch configuration (tl.dot, 16-query blocks, 64-row tiles, many splits and the
    merge kernel), run under the interpreter too; grid data keeps the dot exact, so the result
    must equal the reference bit for bit."""
    from acn_kernels.triton import masked_topk as triton_topk

    if INTERPRET:
        real = triton_topk._config
        monkeypatch.setattr(triton_topk, "_config", lambda B, N, D, k, sms: real(B, N, D, k, 132))
    g = torch.Generator().manual_seed(n * k)
    q, bank = grid_data(b, d, seed=b + 2), grid_data(n, d, seed=n + 2)
    mask = (torch.rand(n, generator=g) < 0.3).to(DEVICE)
    excl = torch.randint(-1, n, (b,), generator=g).to(DEVICE)
    assert_exact(topk(q, bank, k, mask, excl), ref_topk(q, bank, k, mask, excl))
    q, bank = torch.randn(b, d, generator=g).to(DEVICE), torch.randn(n, d, generator=g).to(DEVICE)
    assert_selection_close(topk(q, bank, k), ref_topk(q, bank, k), q, bank)


@given(b=st.integers(1, 20), n=st.integers(1, 600), d=st.integers(1, 20), k_frac=st.floats(0, 1),
       mask_p=st.sampled_from([0.0, 0.5, 0.95]), excl=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_topk_property(b, n, d, k_frac, mask_p, excl, seed):
    """Fresh random problems on the half-integer grid (many exact ties): bit-exact results."""
    k = 1 + int(k_frac * (min(n, 70) - 1))
    g = torch.Generator().manual_seed(seed)
    q, bank = grid_data(b, d, seed=seed), grid_data(n, d, seed=seed + 1)
    mask = (torch.rand(n, generator=g) < mask_p).to(DEVICE)
    ex = torch.randint(-1, n, (b,), generator=g).to(DEVICE) if excl else None
    assert_exact(topk(q, bank, k, mask, ex), ref_topk(q, bank, k, mask, ex))


def test_topk_duplicate_rows_tie_to_smaller_index():
    """Every distinct row appears many times, scattered over tiles and splits."""
    g = torch.Generator().manual_seed(7)
    distinct = torch.randn(40, 24, generator=g)
    rows = torch.randint(0, 40, (1500,), generator=g)
    bank = distinct[rows].to(DEVICE)
    q = (distinct[:5] + 0.01 * torch.randn(5, 24, generator=g)).to(DEVICE)
    d, i = topk(q, bank, 200)
    for r in range(5):
        order = torch.argsort(((q[r].cpu() - distinct) ** 2).sum(1), stable=True)
        want = torch.cat([torch.nonzero(rows == s).flatten() for s in order])[:200]
        assert torch.equal(i[r], want)
        assert torch.equal(d[r][1:] >= d[r][:-1], torch.ones(199, dtype=torch.bool))


def test_topk_non_finite_rows_and_queries_never_paired():
    q, bank = grid_data(6, 5, seed=1), grid_data(300, 5, seed=2)
    bad = torch.tensor([math.nan, math.inf, -math.inf, math.nan], device=DEVICE)
    bank[[0, 7, 150, 299], [1, 0, 4, 2]] = bad
    q[2, 3] = math.nan
    q[4, 0] = -math.inf
    d, i = topk(q, bank, 10)
    assert_exact((d, i), ref_topk(q, bank, 10))
    assert (i[[2, 4]] == -1).all() and torch.isinf(d[[2, 4]]).all() and (d[[2, 4]] > 0).all()
    assert not torch.isin(i, torch.tensor([0, 7, 150, 299])).any()


def test_topk_fewer_eligible_than_k_pads():
    q, bank = grid_data(3, 4, seed=5), grid_data(40, 4, seed=6)
    mask = torch.ones(40, dtype=torch.bool, device=DEVICE)
    mask[[3, 17, 39]] = False
    excl = torch.tensor([17, -1, 3], device=DEVICE)
    d, i = topk(q, bank, 8, mask, excl)
    assert_exact((d, i), ref_topk(q, bank, 8, mask, excl))
    assert ((i >= 0).sum(1) == torch.tensor([2, 3, 2])).all()
    mask[:] = True
    d, i = topk(q, bank, 8, mask)
    assert (i == -1).all() and (d == math.inf).all()


def test_topk_max_k_small_problem():
    q, bank = grid_data(3, 6, seed=8), grid_data(MAX_K + 76, 6, seed=9)
    mask = torch.zeros(MAX_K + 76, dtype=torch.bool, device=DEVICE)
    mask[::10] = True  # fewer than MAX_K eligible rows: a padded tail too
    assert_exact(topk(q, bank, MAX_K), ref_topk(q, bank, MAX_K))
    assert_exact(topk(q, bank, MAX_K, mask), ref_topk(q, bank, MAX_K, mask))
    with pytest.raises(ValueError, match="MAX_K"):
        acn_kernels.masked_topk(q, bank, MAX_K + 1, backend=BE)


def test_topk_overflow_gives_flt_max_and_clamp_gives_plus_zero():
    q = torch.tensor([[1e20, 0.0], [1.0, 2.0]], device=DEVICE)
    bank = torch.tensor([[-1e20, 0.0], [9e19, 1.0], [1.0, 2.0], [5.0, 5.0], [1e20, 3.0]], device=DEVICE)
    d, i = topk(q, bank, 5)
    rd, ri = reference.masked_topk(q.cpu(), bank.cpu(), 5)  # float32: the contract's overflow
    assert torch.equal(i, ri) and torch.equal(d, rd)
    # |q|^2 overflows float32, yet (q - row 4)^2 = 9 and (q - row 1)^2 = 1e38 are representable;
    # (2e20)^2 is not: FLT_MAX, and such pairs are still returned, ties by row.
    assert i[0].tolist() == [4, 1, 0, 2, 3] and d[0, 0] == 9.0 and (d[0, 2:] == FLT_MAX).all()
    assert i[1, 0] == 2 and d[1, 0] == 0.0 and not torch.signbit(d[1, 0])  # +0.0, never -0.0
    # rows that round to a tiny negative expanded distance clamp to +0.0 as well
    q2 = torch.full((1, 3), 0.1, device=DEVICE)
    d2, _ = topk(q2, q2.expand(5, 3).clone(), 5)
    assert (d2 == 0).all() and not torch.signbit(d2).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_half_precision_inputs(dtype):
    q, bank = grid_data(7, 9, seed=3, dtype=dtype), grid_data(300, 9, seed=4, dtype=dtype)
    excl = torch.arange(7, device=DEVICE)
    assert_exact(topk(q, bank, 11, None, excl), ref_topk(q, bank, 11, None, excl))


def test_topk_non_contiguous_inputs():
    q = grid_data(30, 30, seed=3)[::3, 1::2]
    bank = grid_data(15, 400, seed=4).t()
    mask = (torch.arange(800, device=DEVICE) % 3 == 0)[::2]
    excl = (torch.arange(20, device=DEVICE) * 7)[::2]
    assert not (q.is_contiguous() or bank.is_contiguous() or mask.is_contiguous() or excl.is_contiguous())
    assert_exact(topk(q, bank, 9, mask, excl), ref_topk(q, bank, 9, mask, excl))


def test_topk_gradients_match_reference():
    g = torch.Generator().manual_seed(6)
    q0, b0 = torch.randn(7, 10, generator=g), torch.randn(300, 10, generator=g)
    mask = torch.rand(300, generator=g) < 0.97  # 9 or so eligible rows < k: padded entries
    w = torch.randn(7, 12, generator=g)

    def grads(fn, dt, dev):
        q = q0.to(dtype=dt, device=dev).requires_grad_()
        b = b0.to(dtype=dt, device=dev).requires_grad_()
        d, _ = fn(q, b, 12, exclude_mask=mask.to(dev))
        s = (d.nan_to_num(posinf=0.0) * w.to(dtype=d.dtype, device=dev)).sum()
        return torch.autograd.grad(s, (q, b))

    got = grads(lambda *a, **kw: acn_kernels.masked_topk(*a, **kw, backend=BE), torch.float32, DEVICE)
    want = grads(lambda *a, **kw: acn_kernels.masked_topk(*a, **kw, backend="torch"), torch.float64, "cpu")
    for gg, ww in zip(got, want, strict=True):
        assert_close_f64(gg, ww, rtol=1e-4, atol=1e-4)


def test_topk_rejects_float64_and_bad_input():
    q, bank = grid_data(2, 3, seed=0, dtype=torch.float64), grid_data(10, 3, seed=1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        acn_kernels.masked_topk(q, bank, 3, backend=BE)
    q, bank = q.float(), bank.float()
    with pytest.raises(ValueError, match="larger than the bank"):
        torch.ops.acn_kernels.triton_masked_topk(q, bank, 11, None, None)
    with pytest.raises(TypeError, match="exclude_index"):
        torch.ops.acn_kernels.triton_masked_topk(q, bank, 3, None, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="exclude_mask"):
        torch.ops.acn_kernels.triton_masked_topk(q, bank, 3, torch.zeros(9, dtype=torch.bool), None)


def test_topk_opcheck():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 7, generator=g).to(DEVICE).requires_grad_()
    bank = torch.randn(300, 7, generator=g).to(DEVICE).requires_grad_()
    mask = (torch.rand(300, generator=g) < 0.3).to(DEVICE)
    excl = torch.tensor([-1, 0, 3, 299, 2], device=DEVICE)
    torch.library.opcheck(torch.ops.acn_kernels.triton_masked_topk, (q, bank, 6, mask, excl))
    torch.library.opcheck(torch.ops.acn_kernels.triton_masked_topk, (q, bank, 3, None, None))


def test_topk_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(q, bank, mask, excl):
        d, i = acn_kernels.masked_topk(q, bank, 4, exclude_mask=mask, exclude_index=excl, backend=BE)
        return d.sum(), i

    cf = torch.compile(f, fullgraph=True, dynamic=True)
    for b, n in [(6, 50), (9, 77)]:
        q = grid_data(b, 5, seed=b).requires_grad_()
        bank = grid_data(n, 5, seed=n)
        mask = torch.arange(n, device=DEVICE) % 4 == 1
        excl = torch.arange(b, device=DEVICE)
        s, i = cf(q, bank, mask, excl)
        rs, ri = f(q, bank, mask, excl)
        assert torch.equal(i, ri)
        torch.testing.assert_close(s, rs)
        torch.testing.assert_close(torch.autograd.grad(s, q)[0], torch.autograd.grad(rs, q)[0])


# ---------------------------------------------------------------------------------------------
# The GPU code path without a GPU

_SM90_COMPILE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from acn_kernels.triton import masked_topk as tt, mixture as tm

    target = GPUTarget("cuda", 90, 32)

    def build(fn, sig, consts, warps):
        sig = {**sig, **{name: "constexpr" for name in consts}}
        triton.compile(ASTSource(fn, sig, constexprs=consts), target=target, options={"num_warps": warps})

    for dt, has_code, per_dim, (d, m) in [("fp32", True, False, (16, 3)), ("bf16", False, True, (40, 17))]:
        bb, bd, bm = tm._blocks(d, m, False)
        consts = dict(HAS_CODE=has_code, PER_DIM=per_dim, BLOCK_B=bb, BLOCK_D=bd, BLOCK_M=bm)
        ins = {n: "*" + dt for n in ("z_ptr", "lg_ptr", "mu_ptr", "ls_ptr", "code_ptr")}
        build(tm._mixture_fwd_kernel, {**ins, "out_ptr": "*fp32", "lse_ptr": "*fp32", "B": "i32", "D": "i32",
                                       "M": "i32", "d_per_prog": "i32"}, consts, 4)
        grads = {n: "*" + dt for n in ("dz_ptr", "dlg_ptr", "dmu_ptr", "dls_ptr", "dcode_ptr")}
        build(tm._mixture_bwd_kernel, {"grad_ptr": "*fp32", **ins, "lse_ptr": "*fp32", **grads, "B": "i32",
                                       "D": "i32", "M": "i32"}, consts, 4)
    for dt, k, final in [("fp32", 5, False), ("fp16", 40, True), ("fp32", 1024, False)]:
        cfg = tt._config(128, 60000, 16, k, 132)
        kp = cfg["KP"]
        sig = dict(q_ptr="*" + dt, b_ptr="*" + dt, mask_ptr="*u8", exi_ptr="*i64", part_ptr="*i64",
                   dist_ptr="*fp32", idx_ptr="*i64", B="i32", N="i32", D="i32", k="i32",
                   tiles_per_split="i32", stride_qb="i64", stride_qd="i32", stride_bn="i64", stride_bd="i32")
        build(tt._topk_partial_kernel, sig, dict(
            HAS_MASK=True, HAS_EXI=True, FINAL=final, USE_DOT=cfg["use_dot"], BLOCK_Q=cfg["BLOCK_Q"],
            BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], KP=kp, LOG_N=cfg["BLOCK_N"].bit_length() - 1,
            LOG_KP=kp.bit_length() - 1), cfg["num_warps"])
        merge_sig = dict(part_ptr="*i64", dist_ptr="*fp32", idx_ptr="*i64", B="i32", S="i32", k="i32")
        merge_consts = dict(BLOCK_Q=cfg["merge_q"], KP=kp, LOG_KP=kp.bit_length() - 1)
        build(tt._topk_merge_kernel, merge_sig, merge_consts, 4)
    print("compiled")
""")


@pytest.mark.skipif(HAS_GPU, reason="with a GPU every other test compiles and runs the kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter never runs Triton's compiler: compile the GPU configurations of every
    kernel for sm_90 (front end, LLVM and ptxas; no driver needed) in a process without
    TRITON_INTERPRET, so a kernel that only the interpreter accepts fails here."""
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True,
                         timeout=540)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]


# ---------------------------------------------------------------------------------------------
# Issue 13: acn_kl with a posterior log-scale; one Gaussian as an M = 1 mixture


@pytest.mark.parametrize("b,d,m", [(1, 1, 1), (6, 11, 4), (9, 67, 16), (40, 3, 1)])
def test_acn_kl_posterior_log_scale_vs_reference(b, d, m):
    z, lg, mu, ls, code = mixture_inputs(b, d, m, seed=b + d + m)
    g = torch.Generator().manual_seed(b * d)
    pls = torch.empty(b, d, dtype=torch.float64).uniform_(-6.0, 6.0, generator=g).to(dtype=torch.float32,
                                                                                       device=DEVICE)
    inputs = [z, code, lg, mu, ls, pls]

    def tri(*t):
        return acn_kernels.acn_kl(*t[:5], posterior_log_scale=t[5], backend=BE)

    with poisoned_outputs():
        out, grads = value_and_grads(tri, inputs)
    want, want_grads = value_and_grads(reference.acn_kl, f64(inputs))
    assert out.dtype == torch.float32 and out.shape == (b,)
    assert_close_f64(out, want, 1e-4, 1e-4 * (want.abs().max().item() + 1))
    for got, w in zip(grads, want_grads, strict=True):
        assert_close_f64(got, w, 1e-3, 1e-4 * (w.abs().max().item() + 1))


def test_as_mixture_on_triton_is_one_gaussian():
    z, _, mu, ls, code = mixture_inputs(7, 13, 1, seed=3)
    mean, log_scale = mu[..., 0].contiguous(), ls[..., 0].contiguous()
    got = acn_kernels.acn_kl(z, code, *acn_kernels.as_mixture(mean, log_scale), backend=BE)
    zz, cc, mm, ss = f64([z, code, mean, log_scale])
    normal = torch.distributions.Normal
    want = (normal(cc, 1.0).log_prob(zz) - normal(mm, ss.exp()).log_prob(zz)).sum(-1)
    assert_close_f64(got, want, 1e-5, 1e-4)
