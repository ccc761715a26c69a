"""masked_topk on every runnable backend: against the float64 reference, faiss-cpu and
scikit-learn; exact ties, masks, exclusions, NaN/inf, overflow, padding; dtypes and layouts;
registration (opcheck, torch.compile), gradients, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from testing import backend_params, poisoned_outputs, requires_ext

import acn_kernels
from acn_kernels import MAX_K, reference

BACKENDS = backend_params(include_torch=True)
COMPILED = backend_params()
FLT_MAX = torch.finfo(torch.float32).max


def supports(backend: str, dtype: torch.dtype) -> bool:
    """float64 runs on "cpu" and "torch" only (DESIGN.md)."""
    return dtype != torch.float64 or backend in ("cpu", "torch")


def run(backend, queries, bank, k, mask=None, excl=None):
    """masked_topk with outputs poisoned, so an unwritten element cannot pass."""
    with poisoned_outputs():
        d, i = acn_kernels.masked_topk(queries, bank, k, exclude_mask=mask, exclude_index=excl,
                                       backend=backend)
    return d.cpu(), i.cpu()


def grid_data(n, d, *, seed, levels=9, dtype=torch.float32, device="cpu"):
    """Values on a half-integer grid in [-2, 2]: every squared distance is exact in float16 and up,
    in the direct and the expanded form alike, so results must match the reference bit for bit,
    ties included (and there are many ties)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, levels, (n, d), generator=g) - levels // 2).double() / 2
    return x.to(dtype=dtype, device=device)


def check_valid(d, i, queries, bank, k, mask=None, excl=None):
    """Structural checks of a result: shapes, dtypes, padding rules, eligibility, uniqueness,
    order, and that each reported distance is the pair's squared distance (float64 recompute)."""
    acc = torch.float64 if queries.dtype == torch.float64 else torch.float32
    b = queries.shape[0]
    assert d.shape == (b, k) and i.shape == (b, k)
    assert d.dtype == acc and i.dtype == torch.int64
    q64, b64 = queries.detach().cpu().double(), bank.detach().cpu().double()
    pad = i < 0
    assert (i[pad] == -1).all(), "padding index must be -1"
    assert torch.isinf(d[pad]).all() and (d[pad] > 0).all(), "padding dist must be +inf"
    assert (d[~pad] >= 0).all() and torch.isfinite(d[~pad]).all()
    # padding only at the tail
    assert (pad[:, 1:] | ~pad[:, :-1]).all()
    assert (d[:, 1:] >= d[:, :-1]).all(), "dists must be ascending"
    assert (i < bank.shape[0]).all()
    rows = i.clamp_min(0)
    okq = torch.isfinite(q64).all(1)
    okb = torch.isfinite(b64).all(1)
    assert not (~pad & ~okq.unsqueeze(1)).any(), "a non-finite query was paired"
    assert not (~pad & ~okb[rows]).any(), "a non-finite row was returned"
    if mask is not None:
        assert not (~pad & mask.cpu()[rows]).any(), "a masked row was returned"
    if excl is not None:
        assert not (~pad & (i == excl.cpu().unsqueeze(1))).any(), "the excluded row was returned"
    for r in range(b):
        got = i[r][~pad[r]]
        assert got.unique().numel() == got.numel(), "duplicate rows in one result"
    true = ((q64.unsqueeze(1) - b64[rows]) ** 2).sum(-1)
    true = torch.where(torch.isinf(true), torch.full_like(true, FLT_MAX), true)
    scale = (q64.square().sum(1, keepdim=True) + b64[rows].square().sum(-1)).nan_to_num(0)
    tol = 1e-10 if acc == torch.float64 else 2e-6
    err = (d.double() - true).abs()[~pad]
    assert (err <= tol * scale[~pad] + 1e-30).all(), f"reported dists off by {err.max()}"


def assert_same_selection(d, i, ref_d, ref_i, queries, bank):
    """Equal distances within a tolerance scaled by the norms; equal rows except on ties (a row
    whose reference distance is within the tolerance of another's may be swapped)."""
    q64, b64 = queries.detach().cpu().double(), bank.detach().cpu().double()
    qn = q64.square().sum(1, keepdim=True).nan_to_num(0)
    bmax = b64[torch.isfinite(b64).all(1)].square().sum(1).max() if b64.numel() else torch.tensor(0.0)
    tol = 1e-5 * (qn + bmax) + 1e-6
    assert torch.equal(i < 0, ref_i < 0), "padding differs"
    fin = ref_i >= 0
    assert ((d.double() - ref_d.double()).abs()[fin] <= tol.expand_as(d)[fin]).all()
    rd = ref_d.double().nan_to_num(posinf=1e300)
    gap_lo = torch.cat([torch.full_like(rd[:, :1], math.inf), rd[:, 1:] - rd[:, :-1]], 1)
    gap_hi = torch.cat([rd[:, 1:] - rd[:, :-1], torch.full_like(rd[:, :1], math.inf)], 1)
    clear = fin & (gap_lo > 2 * tol) & (gap_hi > 2 * tol)
    assert torch.equal(i[clear], ref_i[clear]), "rows differ where there is no tie"


@pytest.fixture(autouse=True)
def _no_poison_leak():
    yield
    from acn_kernels import _testing

    assert not _testing.POISON


# ---------------------------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "b,n,d,k",
    [(1, 1, 1, 1), (3, 10, 4, 3), (5, 37, 3, 37), (17, 301, 16, 5), (70, 1030, 33, 40), (2, 2500, 7, 100)],
)
def test_grid_data_exact(backend, device, b, n, d, k):
    """Grid data (exact arithmetic, many ties): bit-for-bit the reference, masks and exclusions."""
    dtype = torch.float64 if supports(backend, torch.float64) else torch.float32
    q = grid_data(b, d, seed=n, dtype=dtype, device=device)
    bank = grid_data(n, d, seed=n + 1, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(b)
    mask = (torch.rand(n, generator=g) < 0.3).to(device)
    excl = torch.randint(-1, n, (b,), generator=g).to(device)
    dd, ii = run(backend, q, bank, k, mask, excl)
    rd, ri = reference.masked_topk(q.cpu().double(), bank.cpu().double(), k, mask.cpu(), excl.cpu())
    check_valid(dd, ii, q, bank, k, mask, excl)
    assert torch.equal(ii, ri)
    assert torch.equal(dd.double(), rd)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "b,n,d,k", [(9, 500, 16, 5), (64, 3001, 32, 10), (33, 777, 128, 133), (4, 129, 2, 1)]
)
def test_random_vs_reference(backend, device, dtype, b, n, d, k):
    if not supports(backend, dtype):
        pytest.skip("float64 runs on cpu and torch only")
    g = torch.Generator().manual_seed(n * d)
    q = (torch.randn(b, d, generator=g, dtype=torch.float64) * 3 + 1).to(dtype=dtype, device=device)
    bank = (torch.randn(n, d, generator=g, dtype=torch.float64) * 3).to(dtype=dtype, device=device)
    mask = (torch.rand(n, generator=g) < 0.5).to(device)
    excl = torch.randint(-1, n, (b,), generator=g).to(device)
    dd, ii = run(backend, q, bank, k, mask, excl)
    check_valid(dd, ii, q, bank, k, mask, excl)
    rd, ri = reference.masked_topk(q.cpu().double(), bank.cpu().double(), k, mask.cpu(), excl.cpu())
    if dtype == torch.float64:
        torch.testing.assert_close(dd, rd, rtol=1e-12, atol=1e-12)
        assert torch.equal(ii, ri)
    else:
        assert_same_selection(dd, ii, rd, ri, q, bank)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_duplicate_rows_tie_to_smaller_index(backend, device):
    """Exact ties built on purpose: every distinct row appears several times, scattered, so tied
    rows land in different tiles and bank chunks; ties must resolve to the smaller index."""
    g = torch.Generator().manual_seed(7)
    distinct = torch.randn(40, 24, generator=g)
    n = 6000
    rows = torch.randint(0, 40, (n,), generator=g)
    bank = distinct[rows].to(device)
    q = (distinct[:5] + 0.01 * torch.randn(5, 24, generator=g)).to(device)
    k = 300
    dd, ii = run(backend, q, bank, k)
    check_valid(dd, ii, q, bank, k)
    for r in range(5):
        # rows grouped by their distinct source, in that source's distance order, ascending index
        order = torch.argsort(((q[r].cpu() - distinct) ** 2).sum(1), stable=True)
        want = torch.cat([torch.nonzero(rows == s).flatten() for s in order])[:k]
        assert torch.equal(ii[r], want)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_query_equals_row_gives_zero(backend, device):
    bank = torch.randn(300, 9, generator=torch.Generator().manual_seed(2)).to(device) * 100
    q = bank[[5, 17, 299]].clone()
    dd, ii = run(backend, q, bank, 2)
    assert torch.equal(ii[:, 0], torch.tensor([5, 17, 299]))
    assert (dd[:, 0] == 0).all() and not torch.signbit(dd[:, 0]).any()


# ---------------------------------------------------------------------------------------------
# Independent oracles


def _faiss_search(queries: torch.Tensor, bank: torch.Tensor, k: int, mask: torch.Tensor | None):
    # Imported here so the rest of the file runs where faiss is absent (e.g. the GPU machine).
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank.numpy().astype(np.float32))
    if mask is None:
        return index.search(queries.numpy().astype(np.float32), k)
    # IDSelectorBitmap: a set bit SELECTS a row (the complement of exclude_mask); bit j of byte
    # j // 8 is row j, least significant bit first.
    bits = np.packbits((~mask).numpy(), bitorder="little")
    sel = faiss.IDSelectorBitmap(bank.shape[0], faiss.swig_ptr(bits))
    dists, idx = index.search(queries.numpy().astype(np.float32), k, params=faiss.SearchParameters(sel=sel))
    return dists, idx


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("b,n,d,k", [(50, 4000, 16, 5), (20, 2000, 64, 50), (1, 20000, 8, 7)])
def test_vs_faiss(backend, device, masked, b, n, d, k):
    g = torch.Generator().manual_seed(11 + n)
    q, bank = torch.randn(b, d, generator=g), torch.randn(n, d, generator=g)
    mask = torch.rand(n, generator=g) < 0.5 if masked else None
    fd, fi = _faiss_search(q, bank, k, mask)
    dd, ii = run(backend, q.to(device), bank.to(device), k, None if mask is None else mask.to(device))
    check_valid(dd, ii, q, bank, k, mask)
    assert_same_selection(dd, ii, torch.from_numpy(fd), torch.from_numpy(fi), q, bank)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_vs_sklearn(backend, device):
    neighbors = pytest.importorskip("sklearn.neighbors")
    g = torch.Generator().manual_seed(3)
    q, bank = torch.randn(31, 12, generator=g), torch.randn(1500, 12, generator=g)
    mask = torch.rand(1500, generator=g) < 0.4
    keep = torch.nonzero(~mask).flatten()
    nn = neighbors.NearestNeighbors(n_neighbors=9, algorithm="brute").fit(bank[keep].double().numpy())
    sd, si = nn.kneighbors(q.double().numpy())
    ref_d, ref_i = torch.from_numpy(sd) ** 2, keep[torch.from_numpy(si)]
    dd, ii = run(backend, q.to(device), bank.to(device), 9, mask.to(device))
    check_valid(dd, ii, q, bank, 9, mask)
    assert_same_selection(dd, ii, ref_d, ref_i, q, bank)


# ---------------------------------------------------------------------------------------------
# Properties


@st.composite
def topk_case(draw):
    b = draw(st.integers(1, 9))
    n = draw(st.integers(1, 300))
    d = draw(st.integers(1, 20))
    k = draw(st.integers(1, n))
    seed = draw(st.integers(0, 2**31 - 1))
    mask_p = draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    dup = draw(st.booleans())
    with_excl = draw(st.booleans())
    bad = draw(st.sampled_from(["none", "nan_q", "inf_q", "nan_b", "inf_b", "all"]))
    return b, n, d, k, seed, mask_p, dup, with_excl, bad


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(case=topk_case())
def test_property_vs_reference(backend, device, case):
    """Random shapes, k above the eligible count, masks up to all rows, duplicate rows, exclusions
    anywhere in [-1, N), NaN/inf in queries and bank: bit-for-bit the reference on grid data."""
    b, n, d, k, seed, mask_p, dup, with_excl, bad = case
    dtype = torch.float64 if supports(backend, torch.float64) else torch.float32
    g = torch.Generator().manual_seed(seed)
    q, bank = grid_data(b, d, seed=seed, dtype=dtype), grid_data(n, d, seed=seed + 1, dtype=dtype)
    if dup and n > 1:
        src = torch.randint(0, n, (n // 2,), generator=g)
        dst = torch.randint(0, n, (n // 2,), generator=g)
        bank[dst] = bank[src]
    if bad in ("nan_q", "all"):
        q[torch.randint(0, b, (1,), generator=g), torch.randint(0, d, (1,), generator=g)] = math.nan
    if bad in ("inf_q", "all") and b > 1:
        q[-1, 0] = -math.inf
    if bad in ("nan_b", "all"):
        bank[torch.randint(0, n, (max(1, n // 5),), generator=g), 0] = math.nan
    if bad in ("inf_b", "all"):
        bank[torch.randint(0, n, (max(1, n // 5),), generator=g), -1] = math.inf
    mask = torch.rand(n, generator=g) < mask_p
    excl = torch.randint(-1, n, (b,), generator=g) if with_excl else None
    dd, ii = run(backend, q.to(device), bank.to(device), k, mask.to(device),
                 None if excl is None else excl.to(device))
    check_valid(dd, ii, q, bank, k, mask, excl)
    rd, ri = reference.masked_topk(q.double(), bank.double(), k, mask, excl)
    assert torch.equal(ii, ri)
    assert torch.equal(dd.double(), rd)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_all_rows_masked_and_non_finite(backend, device):
    bank = torch.randn(50, 4, device=device)
    q = torch.randn(3, 4, device=device)
    dd, ii = run(backend, q, bank, 7, torch.ones(50, dtype=torch.bool, device=device))
    assert (ii == -1).all() and torch.isinf(dd).all() and (dd > 0).all()
    bad = torch.full((50, 4), math.nan, device=device)
    bad[::2, 1] = math.inf
    bad[::2, 0] = 0
    dd, ii = run(backend, q, bad, 7)
    assert (ii == -1).all() and torch.isinf(dd).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_overflowing_finite_pair_gives_flt_max(backend, device):
    """A finite pair whose squared distance overflows float32 reports FLT_MAX, ranked last among
    the finite pairs and still before the padding."""
    bank = torch.zeros(6, 3)
    bank[1] = 3e19  # (3e19)^2 * 3 overflows float32
    bank[2] = 1.0
    bank[3, 0] = math.inf
    q = torch.zeros(1, 3)
    mask = torch.tensor([True, False, False, False, True, True])
    dd, ii = run(backend, q.to(device), bank.to(device), 4, mask.to(device))
    assert ii.tolist() == [[2, 1, -1, -1]]
    assert dd[0, 0] == 3.0 and dd[0, 1] == FLT_MAX and math.isinf(dd[0, 2])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("b", [1, 12])
def test_huge_finite_values(backend, device, b):
    """Norms that overflow float32 (the expanded form gives inf/NaN there): pairs still ranked by
    their direct-form distance, FLT_MAX where it overflows, a huge query finds its twin at 0.
    b=12 takes the CPU kernel's GEMM path, b=1 its direct path."""
    bank = grid_data(40, 3, seed=1)
    bank[1] = 3e19
    bank[7] = 2e19
    bank[8] = -2e19
    bank[3, 0] = math.inf
    q = grid_data(b, 3, seed=2)
    q[-1] = 2e19
    dd, ii = run(backend, q.to(device), bank.to(device), 6)
    rd, ri = reference.masked_topk(q, bank, 6)  # float32 arithmetic: the same overflows
    assert torch.equal(ii, ri) and torch.equal(dd, rd)
    assert ii[-1, 0] == 7 and dd[-1, 0] == 0
    assert not (ii == 3).any()
    if b > 1:
        assert (dd[0] < 1e3).all()


# ---------------------------------------------------------------------------------------------
# Dtypes, layouts, sizes


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, device, dtype):
    q = grid_data(23, 19, seed=1, dtype=dtype, device=device)
    bank = grid_data(700, 19, seed=2, dtype=dtype, device=device)
    mask = (torch.arange(700) % 3 == 0).to(device)
    dd, ii = run(backend, q, bank, 12, mask)
    assert dd.dtype == torch.float32
    rd, ri = reference.masked_topk(q.cpu().double(), bank.cpu().double(), 12, mask.cpu())
    assert torch.equal(ii, ri) and torch.equal(dd.double(), rd)
    # random (non-grid) half data: float32 accumulation of the rounded inputs
    g = torch.Generator().manual_seed(5)
    q = torch.randn(23, 19, generator=g).to(dtype=dtype, device=device)
    bank = torch.randn(700, 19, generator=g).to(dtype=dtype, device=device)
    dd, ii = run(backend, q, bank, 12, mask)
    rd, ri = reference.masked_topk(q.cpu().double(), bank.cpu().double(), 12, mask.cpu())
    assert_same_selection(dd, ii, rd, ri, q.float(), bank.float())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    g = torch.Generator().manual_seed(9)
    big_q = grid_data(40, 30, seed=3, device=device)
    bank_t = grid_data(21, 1200, seed=4, device=device)  # [D, N]: the bank is its transpose
    q = big_q[::3, 1::2]  # [14, 15], both strides > 1
    bank = bank_t[:15].t()  # [1200, 15], column-major
    mask_full = (torch.rand(2400, generator=g) < 0.4).to(device)
    mask = mask_full[::2]
    excl_full = torch.randint(-1, 1200, (28,), generator=g).to(device)
    excl = excl_full[::2]
    assert not (q.is_contiguous() or bank.is_contiguous() or mask.is_contiguous() or excl.is_contiguous())
    dd, ii = run(backend, q, bank, 9, mask, excl)
    rd, ri = reference.masked_topk(q.cpu().double(), bank.cpu().double(), 9, mask.cpu(), excl.cpu())
    assert torch.equal(ii, ri) and torch.equal(dd.double(), rd)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_max_k(backend, device):
    """k = MAX_K (the heap path on the CPU), some queries with fewer eligible rows than k."""
    n = MAX_K + 300
    q = grid_data(3, 6, seed=5, device=device)
    bank = grid_data(n, 6, seed=6, device=device)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:400] = True
    excl = torch.tensor([-1, 450, n - 1])
    dd, ii = run(backend, q, bank, MAX_K, mask.to(device), excl.to(device))
    rd, ri = reference.masked_topk(q.cpu().double(), bank.cpu().double(), MAX_K, mask, excl)
    assert torch.equal(ii, ri) and torch.equal(dd.double(), rd)
    assert (ii[:, -100:] == -1).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_one_query_large_bank(backend, device):
    """B=1 against a large bank: the CPU kernel splits the bank into chunks and merges."""
    n = 150_001
    q = grid_data(1, 5, seed=7, device=device)
    bank = grid_data(n, 5, seed=8, device=device)
    mask = (torch.arange(n) % 7 == 0).to(device)
    excl = torch.tensor([int(torch.nonzero((bank.cpu() == q.cpu()).all(1))[0])]) if (
        (bank.cpu() == q.cpu()).all(1).any()) else torch.tensor([n - 1])
    dd, ii = run(backend, q, bank, 60, mask, excl.to(device))
    rd, ri = reference.masked_topk(q.cpu().double(), bank.cpu().double(), 60, mask.cpu(), excl)
    assert torch.equal(ii, ri) and torch.equal(dd.double(), rd)


_ISA_SCRIPT = """
import math, torch, acn_kernels
from acn_kernels import reference
g = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.float64, torch.bfloat16):
    for b, n, d, k in ((3, 5000, 7, 9), (40, 3000, 33, 50)):
        q = ((torch.randint(0, 9, (b, d), generator=g) - 4) / 2).to(dt)
        bank = ((torch.randint(0, 9, (n, d), generator=g) - 4) / 2).to(dt)
        bank[5, 0] = math.nan
        mask = torch.rand(n, generator=g) < 0.3
        excl = torch.randint(-1, n, (b,), generator=g)
        dd, ii = acn_kernels.masked_topk(q, bank, k, exclude_mask=mask, exclude_index=excl, backend="cpu")
        rd, ri = reference.masked_topk(q.double(), bank.double(), k, mask, excl)
        assert torch.equal(ii, ri) and torch.equal(dd.double(), rd), (dt, b, n, d, k)
print("ok")
"""


@requires_ext
@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_cpu_isa_variants(isa):
    """The CPU kernel's baseline and AVX2 variants (this machine picks the best one; ACN_CPU_ISA
    caps it) give the reference's results, both paths, in a fresh process."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ACN_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Registration, compile, gradients


@requires_ext
def test_opcheck():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        q = torch.randn(5, 7, generator=g, dtype=dtype, requires_grad=True)
        bank = torch.randn(40, 7, generator=g, dtype=dtype, requires_grad=True)
        mask = torch.rand(40, generator=g) < 0.3
        excl = torch.tensor([-1, 0, 3, 39, 2])
        torch.library.opcheck(torch.ops.acn_kernels.masked_topk, (q, bank, 6, mask, excl))
        torch.library.opcheck(torch.ops.acn_kernels.masked_topk, (q, bank, 3, None, None))


@pytest.mark.parametrize("backend,device", COMPILED)
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile(backend, device, dynamic):
    torch._dynamo.reset()

    def f(q, bank, mask, excl):
        d, i = acn_kernels.masked_topk(q, bank, 4, exclude_mask=mask, exclude_index=excl, backend=backend)
        return d.sum(), i

    cf = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for b, n in [(6, 50), (9, 77)]:
        q = grid_data(b, 5, seed=b, device=device).requires_grad_()
        bank = grid_data(n, 5, seed=n, device=device)
        mask = (torch.arange(n) % 4 == 1).to(device)
        excl = torch.arange(b).to(device)
        s, i = cf(q, bank, mask, excl)
        rs, ri = f(q, bank, mask, excl)
        assert torch.equal(i, ri)
        torch.testing.assert_close(s, rs)
        (gq,) = torch.autograd.grad(s, q)
        (rq,) = torch.autograd.grad(rs, q)
        torch.testing.assert_close(gq, rq)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradcheck_float64(backend):
    if backend == "cpu" and not acn_kernels.backends()["cpu"]:
        pytest.skip("extension not built")
    g = torch.Generator().manual_seed(4)
    q = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(12, dtype=torch.bool)
    mask[[1, 5]] = True
    excl = torch.tensor([0, -1, 3, 11])

    def f(q, bank):
        # k = 11 > eligible rows for some queries: padded entries carry zero gradient
        out = acn_kernels.masked_topk(q, bank, 11, exclude_mask=mask, exclude_index=excl, backend=backend)
        return out.dists

    torch.autograd.gradcheck(lambda q, b: f(q, b).nan_to_num(posinf=0.0), (q, bank))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backward_matches_reference(backend, device):
    g = torch.Generator().manual_seed(6)
    q0, b0 = torch.randn(7, 10, generator=g), torch.randn(200, 10, generator=g)
    mask = torch.rand(200, generator=g) < 0.5
    w = torch.randn(7, 5, generator=g)
    grads = []
    for be, dev in ((backend, device), ("torch", "cpu")):
        q, bank = q0.to(dev).requires_grad_(), b0.to(dev).requires_grad_()
        d, _ = acn_kernels.masked_topk(q, bank, 5, exclude_mask=mask.to(dev), backend=be)
        grads.append([t.cpu() for t in torch.autograd.grad((d * w.to(dev)).sum(), (q, bank))])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input


def _good():
    return dict(queries=torch.randn(4, 3), bank=torch.randn(10, 3), k=2,
                exclude_mask=torch.zeros(10, dtype=torch.bool), exclude_index=torch.tensor([-1, 0, 9, 2]))


BAD = [
    ("queries", lambda a: a.update(queries=torch.randn(4, 3, 1)), ValueError, "queries must have shape"),
    ("bank rank", lambda a: a.update(bank=torch.randn(10)), ValueError, "bank must have shape"),
    ("D", lambda a: a.update(bank=torch.randn(10, 4)), ValueError, "bank has D=4 but queries has D=3"),
    ("dtype", lambda a: a.update(bank=torch.randn(10, 3, dtype=torch.float64)), TypeError, "bank has dtype"),
    ("int queries", lambda a: a.update(queries=torch.ones(4, 3, dtype=torch.long)), TypeError,
     "queries must be a floating-point"),
    ("k<1", lambda a: a.update(k=0), ValueError, "k must be >= 1"),
    ("k>N", lambda a: a.update(k=11), ValueError, "larger than the bank"),
    ("k>MAX_K", lambda a: a.update(k=MAX_K + 1, bank=torch.randn(MAX_K + 5, 3),
                                   exclude_mask=None), ValueError, "MAX_K"),
    ("k type", lambda a: a.update(k=2.0), TypeError, "k must be an int"),
    ("mask len", lambda a: a.update(exclude_mask=torch.zeros(9, dtype=torch.bool)), ValueError,
     "exclude_mask must have shape"),
    ("mask dtype", lambda a: a.update(exclude_mask=torch.zeros(10)), TypeError,
     "exclude_mask must be a bool"),
    ("excl dtype", lambda a: a.update(exclude_index=torch.zeros(4, dtype=torch.int32)), TypeError,
     "exclude_index must be an int64"),
    ("excl len", lambda a: a.update(exclude_index=torch.zeros(3, dtype=torch.long)), ValueError,
     "exclude_index must have shape"),
    ("excl range hi", lambda a: a.update(exclude_index=torch.tensor([0, 1, 10, 2])), ValueError,
     r"exclude_index values must lie in \[-1, N\)"),
    ("excl range lo", lambda a: a.update(exclude_index=torch.tensor([0, -2, 1, 2])), ValueError,
     "exclude_index values"),
    ("bank device", lambda a: a.update(bank=torch.randn(10, 3, device="meta")), ValueError,
     "bank is on meta"),
    ("mask device", lambda a: a.update(exclude_mask=torch.zeros(10, dtype=torch.bool, device="meta")),
     ValueError, "exclude_mask is on meta"),
    ("excl device", lambda a: a.update(exclude_index=torch.zeros(4, dtype=torch.long, device="meta")),
     ValueError, "exclude_index is on meta"),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name,change,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, device, name, change, exc, match):
    args = _good()
    change(args)
    args = {key: (v.to(device) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v)
            for key, v in args.items()}
    q, bank, k = args.pop("queries"), args.pop("bank"), args.pop("k")
    with pytest.raises(exc, match=match):
        acn_kernels.masked_topk(q, bank, k, backend=backend, **args)


@requires_ext
@pytest.mark.parametrize(
    "name,change,exc,match",
    [b for b in BAD[:13] if b[0] != "k type"],  # the schema itself types k
    ids=[b[0] for b in BAD[:13] if b[0] != "k type"],
)
def test_bad_input_cpp_op(name, change, exc, match):
    """The registered op checks the same things itself (RuntimeError), naming the argument."""
    args = _good()
    change(args)
    with pytest.raises(RuntimeError, match=match.replace("a bool", "bool").replace("an int64", "int64")
                       .replace("a floating-point", "a floating-point")):
        torch.ops.acn_kernels.masked_topk(args["queries"], args["bank"], args["k"], args["exclude_mask"],
                                          args["exclude_index"])
