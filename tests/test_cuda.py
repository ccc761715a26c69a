"""GPU-specific tests of the "cuda" backend (csrc/cuda): the generic suites (test_mixture.py,
test_masked_topk.py) already run "cuda" against the reference on a GPU; here are the things only
a GPU build has: the kernels' internal paths (lanes per row, bank splits and their merge,
queries per block, k = MAX_K), float64 against the reference to 1e-9, fp16/bf16, poisoned
outputs, NaN/inf, ties, streams and devices, opcheck on CUDA tensors, and (behind environment
variables) sizes that fill the GPU and a float16 bank above 2^31 elements.

Without a GPU only the layout checks at the top run. ACN_TEST_FILL_GPU=1 enables the large
sizes, ACN_TEST_HUGE=1 the > 2^31-element bank (about 4.3 GB of GPU memory).
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import re

import pytest
import torch
from testing import poisoned_outputs, tol

import acn_kernels
from acn_kernels import MAX_K, _ext, reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_CUDA_BACKEND = acn_kernels.backends()["cuda"]
_skip_without_cuda = pytest.mark.skipif(not HAS_CUDA_BACKEND, reason="needs a GPU and _C built with CUDA")


def requires_cuda(fn):
    """Marks a test "cuda" (pyproject markers) and skips it without a GPU or a CUDA build."""
    return pytest.mark.cuda(_skip_without_cuda(fn))


FILL_GPU = os.environ.get("ACN_TEST_FILL_GPU", "0") == "1"
HUGE = os.environ.get("ACN_TEST_HUGE", "0") == "1"
FLT_MAX = torch.finfo(torch.float32).max


# ---------------------------------------------------------------------------------------------
# Layout (runs everywhere)


def test_cu_sources_include_no_torch_headers():
    """docs/design.md ("Layout"): .cu files see only CUDA toolkit headers and csrc/include, so nvcc compiles them
    without torch (scripts/ci_cuda_check.sh compiles them that way)."""
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + sorted((ROOT / "csrc" / "cuda").glob("*.cuh"))
    assert sources, "no CUDA sources found"
    bad = re.compile(r'#\s*include\s*[<"](torch|ATen|c10)/')
    for path in sources:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not bad.search(line), f"{path.name}:{n} includes a torch header: {line.strip()}"


def test_cuda_kernels_registered_when_built_with_cuda():
    if _ext.C is None or not _ext.C.built_with_cuda():
        pytest.skip("_C not built with CUDA")
    for op in ("mixture_fwd", "mixture_bwd", "masked_topk"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"acn_kernels::{op}", "CUDA"), op


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_results_table_and_junit(tmp_path):
    """The Python side of scripts/gpu_check.sh: table rows and pytest counts."""
    gc = _gpu_check_module()
    results = tmp_path / "out" / "results.md"
    gc.append_row(results, "build", "_C", "pass", "12 s | log")
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="1" skipped="1">'
        '<testcase classname="t" name="a"><failure/></testcase><testcase classname="t" name="b"><error/>'
        "</testcase></testsuite></testsuites>"
    )
    assert gc.junit_row(str(results), "test", "pytest", str(xml)) == 1
    lines = results.read_text().splitlines()
    assert lines[0] == "| stage | item | result | numbers |"
    assert lines[2] == "| build | _C | pass | 12 s / log |"
    assert lines[3].startswith("| test | pytest | FAIL | 2 passed, 1 failed, 1 errors, 1 skipped")


@pytest.mark.skipif(_ext.C is None, reason="needs the compiled extension")
def test_gpu_check_driver_runs_on_cpu():
    """The sanitizer driver checks its own results: on CPU tensors it drives the cpu kernels."""
    assert _gpu_check_module().driver("cpu") == 0


# ---------------------------------------------------------------------------------------------
# Mixture


def mixture_inputs(b, d, m, *, dtype=torch.float64, seed=0, device="cuda", code=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=g, dtype=torch.float64)
    lg = torch.randn(b, d, m, generator=g, dtype=torch.float64) * 2
    mu = torch.randn(b, d, m, generator=g, dtype=torch.float64)
    ls = torch.randn(b, d, m, generator=g, dtype=torch.float64) * 0.5
    ts = [z, lg, mu, ls] + ([torch.randn(b, d, generator=g, dtype=torch.float64)] if code else [])
    return [t.to(device=device, dtype=dtype) for t in ts]


# (B, D, M): D = 1 (one lane per row), 16 (two rows per warp), 33 and 100 (lanes loop over d),
# M = 1 and a large odd M; B not a multiple of any block size.
MIX_SHAPES = [(1, 1, 1), (5, 16, 3), (37, 33, 5), (3, 100, 17), (300, 7, 2)]


@requires_cuda
@pytest.mark.parametrize("b,d,m", MIX_SHAPES)
@pytest.mark.parametrize("per_dim", [False, True])
def test_mixture_float64_vs_reference(b, d, m, per_dim):
    z, lg, mu, ls = (t.requires_grad_() for t in mixture_inputs(b, d, m, seed=b * d + m))
    with poisoned_outputs():
        out = acn_kernels.mixture_log_prob(z, lg, mu, ls, per_dim=per_dim, backend="cuda")
        grads = torch.autograd.grad(out.sum(), (z, lg, mu, ls))
    ref = reference.mixture_log_prob(z, lg, mu, ls, per_dim)
    ref_grads = torch.autograd.grad(ref.sum(), (z, lg, mu, ls))
    assert out.dtype == torch.float64 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **tol(torch.float64))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **tol(torch.float64))


@requires_cuda
@pytest.mark.parametrize("b,d,m", MIX_SHAPES[1:4])
def test_acn_kl_float64_vs_reference(b, d, m):
    ts = [t.requires_grad_() for t in mixture_inputs(b, d, m, seed=7 + d, code=True)]
    z, lg, mu, ls, code = ts
    with poisoned_outputs():
        out = acn_kernels.acn_kl(z, code, lg, mu, ls, backend="cuda")
        grads = torch.autograd.grad(out.sum(), ts)
    ref = reference.acn_kl(z, code, lg, mu, ls)
    ref_grads = torch.autograd.grad(ref.sum(), ts)
    torch.testing.assert_close(out, ref, **tol(torch.float64))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **tol(torch.float64))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mixture_low_precision_vs_float64(dtype):
    ts = mixture_inputs(64, 24, 3, dtype=dtype, seed=3, code=True)
    z, lg, mu, ls, code = (t.requires_grad_() for t in ts)
    with poisoned_outputs():
        out = acn_kernels.acn_kl(z, code, lg, mu, ls, backend="cuda")
        grads = torch.autograd.grad(out.sum(), (z, lg, mu, ls, code))
    assert out.dtype == torch.float32
    up = [t.detach().double().requires_grad_() for t in (z, lg, mu, ls, code)]
    ref = reference.acn_kl(up[0], up[4], up[1], up[2], up[3])
    ref_grads = torch.autograd.grad(ref.sum(), up)
    # Sums over D = 24 terms: scale the per-element tolerance.
    t = tol(dtype)
    torch.testing.assert_close(out.double(), ref, rtol=t["rtol"], atol=t["atol"] * 24)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **t)


@requires_cuda
def test_mixture_dead_rows_nan_and_inf():
    z, lg, mu, ls = mixture_inputs(4, 9, 3, dtype=torch.float32, seed=11)
    ls = ls.clone()
    ls[0, 2] = -200.0  # every component infinitely narrow: every term -inf -> log p = -inf
    z = z.clone()
    z[1, 4] = math.nan  # NaN in -> NaN out
    lg = lg.clone()
    lg[2, 0, 1] = -math.inf  # a component with zero weight: finite result, zero gradient
    z, lg, mu, ls = (t.requires_grad_() for t in (z, lg, mu, ls))
    with poisoned_outputs():
        out = acn_kernels.mixture_log_prob(z, lg, mu, ls, per_dim=True, backend="cuda")
        grads = torch.autograd.grad(out.nan_to_num(0.0, 0.0, 0.0).sum(), (z, lg, mu, ls))
    assert out[0, 2] == -math.inf
    assert torch.isnan(out[1, 4]) and torch.isfinite(out[2]).all()
    assert all((gr[0, 2] == 0).all() for gr in grads), "a dead row must get zero gradients"
    assert grads[2][2, 0, 1] == 0 and grads[3][2, 0, 1] == 0 and grads[1][2, 0, 1] == 0
    ref = reference.mixture_log_prob(z, lg, mu, ls, True)
    torch.testing.assert_close(out, ref, equal_nan=True, **tol(torch.float32))


@requires_cuda
def test_mixture_empty_and_noncontiguous():
    z, lg, mu, ls = mixture_inputs(6, 0, 2, dtype=torch.float32)
    out = acn_kernels.mixture_log_prob(z, lg, mu, ls, backend="cuda")
    assert torch.equal(out, torch.zeros(6, device="cuda")), "an empty sum over D is 0"
    z, lg, mu, ls = mixture_inputs(5, 12, 4, dtype=torch.float32, seed=2)
    lg_t = lg.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    got = acn_kernels.mixture_log_prob(z[:, :], lg_t, mu, ls, backend="cuda")
    torch.testing.assert_close(got, reference.mixture_log_prob(z, lg, mu, ls), **tol(torch.float32))


@requires_cuda
def test_mixture_opcheck_cuda():
    for dtype in (torch.float32, torch.float64):
        z, lg, mu, ls, code = (t.requires_grad_() for t in mixture_inputs(3, 5, 2, dtype=dtype, code=True))
        for c in (None, code):
            for per_dim in (False, True):
                torch.library.opcheck(torch.ops.acn_kernels.mixture_fwd, (z, lg, mu, ls, c, per_dim))


# ---------------------------------------------------------------------------------------------
# Masked top-k


def exact_dists(q: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """float64 squared distances of the selected pairs (inf at padding)."""
    q64, b64 = q.detach().double(), bank.detach().double()
    d = (q64.unsqueeze(1) - b64[idx.clamp_min(0)]).square().sum(-1)
    return torch.where(idx >= 0, d, math.inf)


def topk(q, bank, k, mask=None, excl=None):
    with poisoned_outputs():
        return acn_kernels.masked_topk(q, bank, k, exclude_mask=mask, exclude_index=excl, backend="cuda")


def check_against_reference(q, bank, k, mask=None, excl=None, exact=True):
    """float64 inputs: identical rows and distances within 1e-9 (random data has no near-ties
    at that precision). Lower precision: same padding, distances close to the reference and to
    each returned pair's true distance."""
    d, i = topk(q, bank, k, mask, excl)
    rd, ri = reference.masked_topk(q, bank, k, mask, excl)
    assert d.shape == (q.shape[0], k) and i.dtype == torch.int64
    assert torch.equal(i < 0, ri < 0), "padding differs"
    assert torch.isinf(d[i < 0]).all()
    if exact:
        assert torch.equal(i, ri)
        torch.testing.assert_close(d, rd, rtol=1e-9, atol=1e-9)
    else:
        scale = 1e-5 * (q.double().square().sum(1, keepdim=True) + bank.double().square().sum(1).max()) + 1e-6
        fin = i >= 0
        assert ((d.double() - rd.double()).abs() <= scale)[fin].all()
        assert ((d.double() - exact_dists(q, bank, i)).abs() <= scale)[fin].all()
    return d, i


# (B, N, D, k): one split (small N), many splits (B = 1, large N: the merge kernel), queries per
# block 8 / 4 / 2 / 1 (B = 17, 3, 2, 1), D not a multiple of the staged chunk, D = 0, k = MAX_K.
TOPK_SHAPES = [
    (17, 300, 7, 5),
    (3, 5000, 33, 100),
    (1, 200_000, 16, 7),
    (2, 70_000, 5, 64),
    (9, 3000, 16, MAX_K),
    (1, 40_000, 3, MAX_K),
    (5, 50, 0, 4),
]


@requires_cuda
@pytest.mark.parametrize("b,n,d,k", TOPK_SHAPES)
def test_topk_float64_vs_reference(b, n, d, k):
    g = torch.Generator().manual_seed(b + n + d + k)
    q = torch.randn(b, d, generator=g, dtype=torch.float64).cuda()
    bank = torch.randn(n, d, generator=g, dtype=torch.float64).cuda()
    mask = (torch.rand(n, generator=g) < 0.3).cuda()
    excl = torch.randint(-1, n, (b,), generator=g).cuda()
    if d == 0:  # every distance is 0: ties everywhere, resolved by row
        d0, i0 = topk(q, bank, k, mask, excl)
        rd, ri = reference.masked_topk(q, bank, k, mask, excl)
        assert torch.equal(i0, ri) and torch.equal(d0, rd)
        return
    check_against_reference(q, bank, k)
    check_against_reference(q, bank, k, mask, excl)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,n,d,k", [(20, 4000, 16, 10), (4, 30_000, 24, 300)])
def test_topk_low_precision(dtype, b, n, d, k):
    g = torch.Generator().manual_seed(n + k)
    q = torch.randn(b, d, generator=g).to(device="cuda", dtype=dtype)
    bank = torch.randn(n, d, generator=g).to(device="cuda", dtype=dtype)
    mask = (torch.rand(n, generator=g) < 0.5).cuda()
    d_, _ = check_against_reference(q, bank, k, mask, exact=False)
    assert d_.dtype == torch.float32


@requires_cuda
def test_topk_fewer_eligible_than_k_nan_inf_and_ties():
    g = torch.Generator().manual_seed(5)
    n, dim = 700, 6
    bank = torch.randn(n, dim, generator=g)
    bank[10] = bank[400]  # exact tie: row 10 must come first
    bank[20, 3] = math.nan  # never returned
    bank[21, 0] = math.inf
    q = torch.randn(6, dim, generator=g)
    q[1] = bank[400]
    q[2, 5] = math.inf  # a non-finite query: all padding
    mask = torch.ones(n, dtype=torch.bool)
    mask[:300] = False  # 300 eligible rows minus the bad ones, fewer than k = 512
    mask[400] = False
    excl = torch.tensor([-1, -1, 5, 10, 0, 299])
    q, bank, mask, excl = q.cuda(), bank.cuda(), mask.cuda(), excl.cuda()
    d, i = check_against_reference(q.double(), bank.double(), 512, mask, excl)
    d32, i32 = topk(q, bank, 512, mask, excl)
    assert (i32[2] == -1).all() and torch.isinf(d32[2]).all()
    assert i32[1, 0] == 10 and i32[1, 1] == 400 and d32[1, 0] == 0 and d32[1, 1] == 0
    assert not torch.isin(i32, torch.tensor([20, 21], device="cuda")).any()
    assert ((i32 >= 0).sum(1)[[0, 1, 3]] == torch.tensor([299, 299, 298], device="cuda")).all()


@requires_cuda
def test_topk_overflow_gives_flt_max():
    """Finite pairs whose float32 distance overflows report FLT_MAX (and tie by row)."""
    q = torch.tensor([[3e19, 0.0], [0.0, 0.0]], device="cuda")
    bank = torch.tensor([[-3e19, 0.0], [1.0, 0.0], [2.0, 0.0]], device="cuda")
    d, i = topk(q, bank, 3)
    assert d[0].tolist() == [FLT_MAX] * 3 and i[0].tolist() == [0, 1, 2]
    assert d[1].tolist() == [1.0, 4.0, FLT_MAX] and i[1].tolist() == [1, 2, 0]


@requires_cuda
def test_topk_gradients_vs_reference():
    g = torch.Generator().manual_seed(9)
    q = torch.randn(7, 10, generator=g, dtype=torch.float64).cuda().requires_grad_()
    bank = torch.randn(3000, 10, generator=g, dtype=torch.float64).cuda().requires_grad_()
    mask = (torch.rand(3000, generator=g) < 0.5).cuda()
    w = torch.rand(7, 40, generator=g, dtype=torch.float64).cuda()
    out = acn_kernels.masked_topk(q, bank, 40, exclude_mask=mask, backend="cuda")
    gq, gb = torch.autograd.grad((out.dists * w).sum(), (q, bank))
    rd, _ = reference.masked_topk(q, bank, 40, mask)
    rq, rb = torch.autograd.grad((rd * w).sum(), (q, bank))
    torch.testing.assert_close(gq, rq, **tol(torch.float64))
    torch.testing.assert_close(gb, rb, **tol(torch.float64))


@requires_cuda
def test_topk_opcheck_cuda():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        q = torch.randn(5, 7, generator=g, dtype=dtype).cuda().requires_grad_()
        bank = torch.randn(40, 7, generator=g, dtype=dtype).cuda().requires_grad_()
        mask = (torch.rand(40, generator=g) < 0.3).cuda()
        excl = torch.tensor([-1, 0, 3, 39, 2], device="cuda")
        torch.library.opcheck(torch.ops.acn_kernels.masked_topk, (q, bank, 6, mask, excl))
        torch.library.opcheck(torch.ops.acn_kernels.masked_topk, (q, bank, 3, None, None))


# ---------------------------------------------------------------------------------------------
# Streams and devices


@requires_cuda
def test_kernels_run_on_the_current_stream():
    """Inputs are written on a side stream behind a long sleep; ops launched on that stream must
    see the written values (an op on the default stream would read the stale zeros)."""
    g = torch.Generator().manual_seed(1)
    src_q, src_b = torch.randn(4, 8, generator=g).cuda(), torch.randn(500, 8, generator=g).cuda()
    src = mixture_inputs(4, 8, 3, dtype=torch.float32)
    want_topk = reference.masked_topk(src_q, src_b, 5)
    want_mix = reference.mixture_log_prob(*src)
    q, bank = torch.zeros_like(src_q), torch.zeros_like(src_b)
    mix = [torch.zeros_like(t) for t in src]
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # about 20-50 ms of GPU time
        q.copy_(src_q)
        bank.copy_(src_b)
        for dst, t in zip(mix, src, strict=True):
            dst.copy_(t)
        d, i = acn_kernels.masked_topk(q, bank, 5, backend="cuda")
        lp = acn_kernels.mixture_log_prob(*mix, backend="cuda")
    s.synchronize()
    assert torch.equal(i, want_topk[1])
    torch.testing.assert_close(lp, want_mix, **tol(torch.float32))


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    g = torch.Generator().manual_seed(2)
    q, bank = torch.randn(3, 4, generator=g).to("cuda:1"), torch.randn(100, 4, generator=g).to("cuda:1")
    d, i = acn_kernels.masked_topk(q, bank, 4, backend="cuda")
    assert i.device == q.device
    assert torch.equal(i.cpu(), reference.masked_topk(q.cpu(), bank.cpu(), 4)[1])
    z, lg, mu, ls = mixture_inputs(3, 4, 2, dtype=torch.float32, device="cuda:1")
    torch.testing.assert_close(acn_kernels.mixture_log_prob(z, lg, mu, ls, backend="cuda").cpu(),
                               reference.mixture_log_prob(z, lg, mu, ls).cpu(), **tol(torch.float32))


# ---------------------------------------------------------------------------------------------
# Sizes that fill the GPU (opt-in)


@requires_cuda
@pytest.mark.skipif(not FILL_GPU, reason="set ACN_TEST_FILL_GPU=1")
@pytest.mark.parametrize(
    "b,n,d,k", [(1024, 2_000_000, 16, 5), (256, 1_000_000, 64, 1024), (8192, 100_000, 16, 132)]
)
def test_topk_fill_gpu(b, n, d, k):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, d, device="cuda", generator=g)
    bank = torch.randn(n, d, device="cuda", generator=g)
    mask = torch.rand(n, device="cuda", generator=g) < 0.1
    check_against_reference(q, bank, k, mask, exact=False)


@requires_cuda
@pytest.mark.skipif(not FILL_GPU, reason="set ACN_TEST_FILL_GPU=1")
def test_mixture_fill_gpu():
    z, lg, mu, ls = mixture_inputs(65536, 64, 8, dtype=torch.float32, seed=4)
    torch.testing.assert_close(acn_kernels.mixture_log_prob(z, lg, mu, ls, backend="cuda").double(),
                               reference.mixture_log_prob(*(t.double() for t in (z, lg, mu, ls))),
                               rtol=1e-4, atol=1e-3)


@requires_cuda
@pytest.mark.skipif(not HUGE, reason="set ACN_TEST_HUGE=1 (about 4.3 GB of GPU memory)")
def test_topk_bank_above_2_pow_31_elements():
    """float16 bank with more than 2^31 elements: rows whose offsets only fit in 64 bits are
    found, masked and excluded correctly."""
    d = 16
    n = (1 << 31) // d + 4096
    bank = torch.empty(n, d, device="cuda", dtype=torch.float16)
    bank.uniform_(-1.0, 1.0)
    far = [n - 1, n - 2, n - 3000]
    q = bank[far].clone()  # planted: each query equals a row past 2^31 elements
    d_, i = topk(q, bank, 3)
    assert i[:, 0].tolist() == far and (d_[:, 0] == 0).all()
    mask = torch.zeros(n, dtype=torch.bool, device="cuda")
    mask[n - 1] = True
    excl = torch.tensor([-1, n - 2, -1], device="cuda")
    _, i2 = topk(q, bank, 3, mask, excl)
    assert i2[0, 0] != n - 1 and i2[1, 0] != n - 2 and i2[2, 0] == n - 3000
    assert (i2 >= 0).all() and (i2 < n).all()
