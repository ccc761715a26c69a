"""masked_topk's contract (docs/design.md, "masked_topk"), each rule once, on every backend x
device x dtype of the capability table (testing.params): against the float64 reference,
faiss-cpu and scikit-learn; exact ties, masks, exclusions, NaN/inf, overflow, padding; layouts
and sizes that take every kernel's internal paths; registration (opcheck, torch.compile),
gradients, bad input, streams. Every kernel call runs with poisoned outputs (testing.run_topk).

Under the Triton interpreter (backend "triton" on CPU tensors) shapes are scaled down
(testing.sized) or the case is skipped: a GPU runs it. ACN_TEST_FILL_GPU=1 enables sizes that fill
a GPU, ACN_TEST_HUGE=1 a float16 bank above 2^31 elements (about 4.3 GB of GPU memory).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from testing import (
    COMPILED,
    RTOL,
    assert_close,
    assert_topk_close,
    assert_topk_exact,
    check_topk,
    f64,
    grid_data,
    normal,
    params,
    poisoned_outputs,
    ref_topk,
    run_topk,
    sized,
    skip_if_interpreted,
    topk_inputs,
    topk_rtol,
    unsupported_params,
)

import acn_kernels
from acn_kernels import MAX_K, reference

OP = "masked_topk"
ALL = params(OP)
F32 = params(OP, dtypes=[torch.float32])
F32_F64 = params(OP, dtypes=[torch.float32, torch.float64])
F64 = params(OP, dtypes=[torch.float64])
GPU = params(OP, dtypes=[torch.float32], devices=["cuda"])
FILL_GPU = os.environ.get("ACN_TEST_FILL_GPU", "0") == "1"
HUGE = os.environ.get("ACN_TEST_HUGE", "0") == "1"
pytestmark = [
    # The interpreter evaluates masked-off lanes too (e.g. inf - inf); numpy warns about them.
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]


def grid_problem(b, n, d, *, seed, dtype, device, masked=0.3):
    """Grid queries and bank (exact arithmetic, many ties) with a random mask and exclusions."""
    g = torch.Generator().manual_seed(seed)
    q = grid_data(b, d, seed=seed, dtype=dtype, device=device)
    bank = grid_data(n, d, seed=seed + 1, dtype=dtype, device=device)
    mask = (torch.rand(n, generator=g) < masked).to(device)
    excl = torch.randint(-1, n, (b,), generator=g).to(device)
    return q, bank, mask, excl


# ---------------------------------------------------------------------------------------------
# Against the reference


# N > 256 splits the bank under the interpreter (its merge kernel), D = 70 > the 64-wide
# dimension block, D = 0 makes every distance 0 (ties everywhere, resolved by row). Banks above
# INTERPRETER_ROWS are left to the compiled backends (and Triton on a GPU).
GRID_CASES = [(1, 1, 1, 1), (3, 10, 4, 3), (5, 37, 3, 37), (17, 301, 16, 5), (70, 530, 33, 40),
              (2, 900, 7, 100), (9, 260, 70, 17), (5, 50, 0, 4), (70, 1030, 33, 40), (2, 2500, 7, 100)]
INTERPRETER_ROWS = 1000


@pytest.mark.parametrize("backend,device,dtype", ALL)
@pytest.mark.parametrize("b,n,d,k", GRID_CASES)
def test_grid_data_exact(backend, device, dtype, b, n, d, k):
    """Grid data: bit for bit the reference, with a mask and exclusions, in every dtype."""
    if n > INTERPRETER_ROWS:
        skip_if_interpreted(backend, device)
    q, bank, mask, excl = grid_problem(b, n, d, seed=n + d, dtype=dtype, device=device)
    got = run_topk(backend, q, bank, k, mask, excl)
    check_topk(*got, q, bank, k, mask, excl)
    assert_topk_exact(got, ref_topk(q, bank, k, mask, excl))


@pytest.mark.parametrize("backend,device,dtype", ALL)
@pytest.mark.parametrize(
    "b,n,d,k", [(9, 500, 16, 5), (64, 3001, 32, 10), (33, 777, 128, 133), (4, 129, 2, 1), (4, 30_000, 24, 300)]
)
def test_random_vs_reference(backend, device, dtype, b, n, d, k):
    """Normal data away from the origin: dists within rounding of themselves, the reference's
    rows except on near-ties (float64: the same rows)."""
    if n > INTERPRETER_ROWS:
        skip_if_interpreted(backend, device)
    q, bank, mask, excl = topk_inputs(b, n, d, seed=n * d, masked=0.5, excluded=True, loc=1.0, scale=3.0,
                                      dtype=dtype, device=device)
    got = run_topk(backend, q, bank, k, mask, excl)
    want = ref_topk(q, bank, k, mask, excl)
    if dtype == torch.float64:
        assert torch.equal(got[1], want[1])
    check_topk(*got, q, bank, k, mask, excl)
    assert_topk_close(got, want, q, bank, rtol=2 * topk_rtol(dtype, d))


@pytest.mark.parametrize("backend,device,dtype", F32)
def test_duplicate_rows_tie_to_smaller_index(backend, device, dtype):
    """Exact ties built on purpose: every distinct row appears several times, scattered, so tied
    rows land in different tiles and bank chunks; ties must resolve to the smaller index."""
    n, k = sized(backend, device, (6000, 300), (1500, 200))
    g = torch.Generator().manual_seed(7)
    distinct = torch.randn(40, 24, generator=g)
    rows = torch.randint(0, 40, (n,), generator=g)
    bank = distinct[rows].to(device)
    q = (distinct[:5] + 0.01 * torch.randn(5, 24, generator=g)).to(device)
    d, i = run_topk(backend, q, bank, k)
    check_topk(d, i, q, bank, k)
    for r in range(5):
        # rows grouped by their distinct source, in that source's distance order, ascending index
        order = torch.argsort(((q[r].cpu() - distinct) ** 2).sum(1), stable=True)
        want = torch.cat([torch.nonzero(rows == s).flatten() for s in order])[:k]
        assert torch.equal(i[r], want)


@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_dists_are_direct_form(backend, device, dtype):
    """Near neighbours far from the origin: each reported distance is the direct form
    sum_d (q_d - b_d)^2 within rounding of itself. Half the dimensions sit near 1000, half near 0
    (so that even bfloat16 products do not add up exactly in float32): the expanded form would
    cancel norms of about 8e6 and miss distances of about 1e-2."""
    g = torch.Generator().manual_seed(12)
    centers = torch.cat([normal(8, 8, seed=g, loc=1000.0), torch.zeros(8, 8, dtype=torch.float64)], 1)
    noise = torch.tensor([0.05] * 8 + [0.01] * 8, dtype=torch.float64)
    q = (centers + normal(8, 16, seed=g, dtype=torch.float64) * noise).to(dtype=dtype, device=device)
    bank = centers[torch.randint(0, 8, (400,), generator=g)] + normal(400, 16, seed=g, dtype=torch.float64) * noise
    bank = bank.to(dtype=dtype, device=device)
    got = run_topk(backend, q, bank, 20)
    check_topk(*got, q, bank, 20)
    assert_topk_close(got, ref_topk(q, bank, 20), q, bank, rtol=2 * topk_rtol(dtype, 16))


@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_zero_distance_is_plus_zero(backend, device, dtype):
    """A query equal to a row finds it at +0.0 (never -0.0), also where the expanded form would
    round to a tiny negative value (clamped at +0.0)."""
    bank = (torch.randn(300, 9, generator=torch.Generator().manual_seed(2)) * 100).to(dtype=dtype, device=device)
    q = bank[[5, 17, 299]].clone()
    d, i = run_topk(backend, q, bank, 2)
    assert torch.equal(i[:, 0], torch.tensor([5, 17, 299]))
    assert (d[:, 0] == 0).all() and not torch.signbit(d[:, 0]).any()
    q2 = torch.full((1, 3), 0.1, dtype=dtype, device=device)
    d2, _ = run_topk(backend, q2, q2.expand(5, 3).clone(), 5)
    assert (d2 == 0).all() and not torch.signbit(d2).any()


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
    return index.search(queries.numpy().astype(np.float32), k, params=faiss.SearchParameters(sel=sel))


@pytest.mark.parametrize("backend,device,dtype", F32)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("b,n,d,k", [(50, 4000, 16, 5), (20, 2000, 64, 50), (1, 20000, 8, 7)])
def test_vs_faiss(backend, device, dtype, masked, b, n, d, k):
    b, n = sized(backend, device, (b, n), (min(b, 16), min(n, 600)))
    q, bank, mask, _ = topk_inputs(b, n, d, seed=11 + n, masked=0.5 if masked else 0.0)
    fd, fi = _faiss_search(q, bank, k, mask)
    got = run_topk(backend, q.to(device), bank.to(device), k, None if mask is None else mask.to(device))
    check_topk(*got, q, bank, k, mask)
    # faiss ranks by the expanded form in float32: its near-ties may differ by its rounding.
    assert_topk_close(got, (torch.from_numpy(fd), torch.from_numpy(fi)), q, bank, rtol=1e-5)


@pytest.mark.parametrize("backend,device,dtype", F32)
def test_vs_sklearn(backend, device, dtype):
    neighbors = pytest.importorskip("sklearn.neighbors")
    q, bank, mask, _ = topk_inputs(31, sized(backend, device, 1500, 500), 12, seed=3, masked=0.4)
    keep = torch.nonzero(~mask).flatten()
    nn = neighbors.NearestNeighbors(n_neighbors=9, algorithm="brute").fit(bank[keep].double().numpy())
    sd, si = nn.kneighbors(q.double().numpy())
    got = run_topk(backend, q.to(device), bank.to(device), 9, mask.to(device))
    check_topk(*got, q, bank, 9, mask)
    assert_topk_close(got, (torch.from_numpy(sd) ** 2, keep[torch.from_numpy(si)]), q, bank,
                      rtol=2 * topk_rtol(dtype, 12))


# ---------------------------------------------------------------------------------------------
# Properties and edge cases


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


@pytest.mark.parametrize("backend,device,dtype", ALL)
@given(case=topk_case())
def test_property_vs_reference(backend, device, dtype, case):
    """Random shapes, k above the eligible count, masks up to all rows, duplicate rows, exclusions
    anywhere in [-1, N), NaN/inf in queries and bank: bit for bit the reference on grid data."""
    b, n, d, k, seed, mask_p, dup, with_excl, bad = case
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
    got = run_topk(backend, q.to(device), bank.to(device), k, mask.to(device),
                   None if excl is None else excl.to(device))
    check_topk(*got, q, bank, k, mask, excl)
    assert_topk_exact(got, ref_topk(q, bank, k, mask, excl))


@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_padding_ties_and_non_finite(backend, device, dtype):
    """Fewer eligible rows than k pad with (+inf, -1); an exact duplicate ties to the smaller
    row; a row or query holding NaN or inf is never paired; all rows masked, or all non-finite,
    give all padding."""
    n, dim, k = 700, 6, 512
    bank = grid_data(n, dim, seed=5)
    bank[10] = bank[400]  # exact tie: row 10 must come first
    bank[20, 3] = math.nan
    bank[21, 0] = math.inf
    bank[22, 5] = -math.inf
    q = grid_data(6, dim, seed=6)
    q[1] = bank[400]
    q[2, 5] = math.inf  # a non-finite query: all padding
    q[4, 0] = math.nan
    mask = torch.ones(n, dtype=torch.bool)
    mask[:300] = False  # 300 eligible rows minus the bad ones, fewer than k
    mask[400] = False
    excl = torch.tensor([-1, -1, 5, 10, 0, 299])
    q, bank, mask, excl = (t.to(device) for t in (q.to(dtype), bank.to(dtype), mask, excl))
    got = run_topk(backend, q, bank, k, mask, excl)
    check_topk(*got, q, bank, k, mask, excl)
    assert_topk_exact(got, ref_topk(q, bank, k, mask, excl))
    d, i = got
    assert (i[[2, 4]] == -1).all() and (d[[2, 4]] == math.inf).all()
    assert i[1, 0] == 10 and i[1, 1] == 400 and d[1, 0] == 0 and d[1, 1] == 0
    assert not torch.isin(i, torch.tensor([20, 21, 22])).any()
    assert ((i >= 0).sum(1)[[0, 1, 3, 5]] == torch.tensor([298, 298, 297, 297])).all()
    d, i = run_topk(backend, q, bank, 7, torch.ones(n, dtype=torch.bool, device=device))
    assert (i == -1).all() and (d == math.inf).all()
    bad = torch.full((50, dim), math.nan, dtype=dtype, device=device)
    bad[::2, 1] = math.inf
    bad[::2, 0] = 0
    d, i = run_topk(backend, q, bad, 7)
    assert (i == -1).all() and (d == math.inf).all()


@pytest.mark.parametrize("backend,device,dtype", F32_F64)
def test_overflowing_finite_pair_gives_dtype_max(backend, device, dtype):
    """A finite pair whose squared distance overflows the result dtype reports its largest finite
    value, ranked after the other finite pairs and before the padding; such pairs tie by row."""
    big = 3e19 if dtype == torch.float32 else 3e154  # 3 * big^2 overflows float32 / float64
    top = torch.finfo(dtype).max
    bank = torch.zeros(6, 3, dtype=dtype)
    bank[1] = big
    bank[2] = 1.0
    bank[3, 0] = math.inf
    q = torch.zeros(1, 3, dtype=dtype)
    mask = torch.tensor([True, False, False, False, True, True])
    d, i = run_topk(backend, q.to(device), bank.to(device), 4, mask.to(device))
    assert i.tolist() == [[2, 1, -1, -1]]
    assert d[0, 0] == 3.0 and d[0, 1] == top and math.isinf(d[0, 2])
    q = torch.tensor([[big, 0.0], [0.0, 0.0]], dtype=dtype)
    bank = torch.tensor([[-big, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=dtype)
    d, i = run_topk(backend, q.to(device), bank.to(device), 3)
    assert d[0].tolist() == [top] * 3 and i[0].tolist() == [0, 1, 2]
    assert d[1].tolist() == [1.0, 4.0, top] and i[1].tolist() == [1, 2, 0]


@pytest.mark.parametrize("backend,device,dtype", F32)
@pytest.mark.parametrize("b", [1, 12])
def test_huge_finite_values(backend, device, dtype, b):
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
    d, i = run_topk(backend, q.to(device), bank.to(device), 6)
    assert_topk_exact((d, i), reference.masked_topk(q, bank, 6))  # float32: the same overflows
    assert i[-1, 0] == 7 and d[-1, 0] == 0
    assert not (i == 3).any()
    if b > 1:
        assert (d[0] < 1e3).all()


# ---------------------------------------------------------------------------------------------
# Layouts and sizes


@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_non_contiguous_inputs(backend, device, dtype):
    g = torch.Generator().manual_seed(9)
    q = grid_data(40, 30, seed=3, dtype=dtype, device=device)[::3, 1::2]  # [14, 15], both strides > 1
    bank = grid_data(21, 1200, seed=4, dtype=dtype, device=device)[:15].t()  # [1200, 15], column-major
    mask = (torch.rand(2400, generator=g) < 0.4).to(device)[::2]
    excl = torch.randint(-1, 1200, (28,), generator=g).to(device)[::2]
    assert not (q.is_contiguous() or bank.is_contiguous() or mask.is_contiguous() or excl.is_contiguous())
    assert_topk_exact(run_topk(backend, q, bank, 9, mask, excl), ref_topk(q, bank, 9, mask, excl))


# Every kernel's internal paths: k = MAX_K (the CPU heap path) with fewer eligible rows than k;
# B = 1 against large banks (the CPU kernel's bank chunks and their merge, the GPU kernels' bank
# splits and merge kernel); queries per CUDA block 8 / 4 / 2 / 1 (B = 9, 3, 2, 1).
LARGE_CASES = [(3, MAX_K + 300, 6, MAX_K), (1, 150_001, 5, 60), (1, 200_000, 16, 7), (2, 70_000, 5, 64),
               (9, 3000, 16, MAX_K), (1, 40_000, 3, MAX_K)]


@pytest.mark.parametrize("backend,device,dtype", ALL)
@pytest.mark.parametrize("b,n,d,k", LARGE_CASES)
def test_large_banks_and_max_k(backend, device, dtype, b, n, d, k):
    if n > 2 * INTERPRETER_ROWS:
        skip_if_interpreted(backend, device)
    q, bank, mask, excl = grid_problem(b, n, d, seed=n + k, dtype=dtype, device=device, masked=0.0)
    mask[: min(400, n // 3)] = True
    excl[0] = n - 1
    got = run_topk(backend, q, bank, k, mask, excl)
    assert_topk_exact(got, ref_topk(q, bank, k, mask, excl))
    if n - min(400, n // 3) < k:
        assert (got[1][:, -100:] == -1).all()


@pytest.mark.parametrize("backend,device,dtype", GPU)
@pytest.mark.skipif(not FILL_GPU, reason="set ACN_TEST_FILL_GPU=1")
@pytest.mark.parametrize("b,n,d,k", [(1024, 2_000_000, 16, 5), (256, 1_000_000, 64, 1024), (8192, 100_000, 16, 132)])
def test_fill_gpu(backend, device, dtype, b, n, d, k):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, d, device=device, generator=g)
    bank = torch.randn(n, d, device=device, generator=g)
    mask = torch.rand(n, device=device, generator=g) < 0.1
    with poisoned_outputs():
        got = acn_kernels.masked_topk(q, bank, k, exclude_mask=mask, backend=backend)
    want = acn_kernels.masked_topk(q, bank, k, exclude_mask=mask, backend="torch")
    assert_topk_close([t.cpu() for t in got], [t.cpu() for t in want], q, bank, rtol=2 * topk_rtol(dtype, d))


@pytest.mark.parametrize("backend,device,dtype", params(OP, dtypes=[torch.float16], devices=["cuda"],
                                                        backends=COMPILED))
@pytest.mark.skipif(not HUGE, reason="set ACN_TEST_HUGE=1 (about 4.3 GB of GPU memory)")
def test_bank_above_2_pow_31_elements(backend, device, dtype):
    """float16 bank with more than 2^31 elements: rows whose offsets only fit in 64 bits are
    found, masked and excluded correctly."""
    d = 16
    n = (1 << 31) // d + 4096
    bank = torch.empty(n, d, device=device, dtype=dtype)
    bank.uniform_(-1.0, 1.0)
    far = [n - 1, n - 2, n - 3000]
    q = bank[far].clone()  # planted: each query equals a row past 2^31 elements
    dd, i = run_topk(backend, q, bank, 3)
    assert i[:, 0].tolist() == far and (dd[:, 0] == 0).all()
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[n - 1] = True
    excl = torch.tensor([-1, n - 2, -1], device=device)
    _, i2 = run_topk(backend, q, bank, 3, mask, excl)
    assert i2[0, 0] != n - 1 and i2[1, 0] != n - 2 and i2[2, 0] == n - 3000
    assert (i2 >= 0).all() and (i2 < n).all()


@pytest.mark.parametrize("backend,device,dtype", GPU)
def test_runs_on_the_current_stream(backend, device, dtype):
    """Inputs are written on a side stream behind a long sleep; the op launched on that stream
    must see the written values (an op on the default stream would read the stale zeros)."""
    src_q, src_b, _, _ = topk_inputs(4, 500, 8, seed=1, device=device)
    want = reference.masked_topk(src_q, src_b, 5)
    q, bank = torch.zeros_like(src_q), torch.zeros_like(src_b)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # about 20-50 ms of GPU time
        q.copy_(src_q)
        bank.copy_(src_b)
        _, i = acn_kernels.masked_topk(q, bank, 5, backend=backend)
    s.synchronize()
    assert torch.equal(i, want[1])


@pytest.mark.parametrize("backend,device,dtype", GPU)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device(backend, device, dtype):
    q, bank, _, _ = topk_inputs(3, 100, 4, seed=2, device="cuda:1")
    d, i = acn_kernels.masked_topk(q, bank, 4, backend=backend)
    assert i.device == q.device
    assert_topk_exact((d.cpu(), i.cpu()), reference.masked_topk(q.cpu(), bank.cpu(), 4))


# ---------------------------------------------------------------------------------------------
# Registration, compile, gradients


def _registered(backend: str):
    """The registered op of a compiled backend (its Triton module imported)."""
    if backend == "triton":
        from acn_kernels.triton import masked_topk  # noqa: F401  (registers the op)

        return torch.ops.acn_kernels.triton_masked_topk
    return torch.ops.acn_kernels.masked_topk


@pytest.mark.parametrize("backend,device,dtype", params(OP, dtypes=[torch.float32, torch.float64],
                                                        backends=COMPILED))
def test_opcheck(backend, device, dtype):
    """Schema, fake kernel, autograd registration of the op (torch.library.opcheck)."""
    n = sized(backend, device, 300, 60)
    q, bank, mask, excl = topk_inputs(5, n, 7, seed=0, masked=0.3, dtype=dtype, device=device)
    excl = torch.tensor([-1, 0, 3, n - 1, 2], device=device)
    q.requires_grad_()
    bank.requires_grad_()
    op = _registered(backend)
    torch.library.opcheck(op, (q, bank, 6, mask, excl))
    torch.library.opcheck(op, (q, bank, 3, None, None))


@pytest.mark.parametrize("backend,device,dtype", params(OP, dtypes=[torch.float32], backends=COMPILED))
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile(backend, device, dtype, dynamic):
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


@pytest.mark.parametrize("backend,device,dtype", F64)
def test_gradcheck(backend, device, dtype):
    q, bank, _, _ = topk_inputs(4, 12, 3, seed=4, dtype=dtype, device=device)
    q.requires_grad_()
    bank.requires_grad_()
    mask = torch.zeros(12, dtype=torch.bool, device=device)
    mask[[1, 5]] = True
    excl = torch.tensor([0, -1, 3, 11], device=device)

    def f(q, bank):
        # k = 11 > eligible rows for some queries: padded entries carry zero gradient
        out = acn_kernels.masked_topk(q, bank, 11, exclude_mask=mask, exclude_index=excl, backend=backend)
        return out.dists.nan_to_num(posinf=0.0)

    torch.autograd.gradcheck(f, (q, bank))


@pytest.mark.parametrize("backend,device,dtype", ALL)
def test_backward_vs_reference(backend, device, dtype):
    """Gradients with respect to queries and bank, padded entries included (about 9 eligible rows
    for k = 12), in the input dtype, against the float64 reference on the same inputs."""
    q0, b0, _, _ = topk_inputs(7, 300, 10, seed=6, dtype=dtype)
    mask = torch.rand(300, generator=torch.Generator().manual_seed(6)) < 0.97
    w = torch.randn(7, 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def grads(be, q, bank):
        q, bank = q.detach().requires_grad_(), bank.detach().requires_grad_()
        with poisoned_outputs():
            d, _ = acn_kernels.masked_topk(q, bank, 12, exclude_mask=mask.to(q.device), backend=be)
            s = (d.nan_to_num(posinf=0.0) * w.to(dtype=d.dtype, device=d.device)).sum()
            return torch.autograd.grad(s, (q, bank))

    got = grads(backend, q0.to(device), b0.to(device))
    want = grads("torch", *f64((q0, b0)))
    for name, g, ww in zip(("dqueries", "dbank"), got, want, strict=True):
        assert g.dtype == dtype, name
        assert_close(g, ww, rtol=2 * RTOL[dtype], msg=name)


# ---------------------------------------------------------------------------------------------
# Bad input


def _good():
    return dict(queries=torch.randn(4, 3), bank=torch.randn(10, 3), k=2,
                exclude_mask=torch.zeros(10, dtype=torch.bool), exclude_index=torch.tensor([-1, 0, 9, 2]))


# (name, change, exception, message); the first STRUCTURAL ones the registered ops check too.
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
    ("mask len", lambda a: a.update(exclude_mask=torch.zeros(9, dtype=torch.bool)), ValueError,
     "exclude_mask must have shape"),
    ("mask dtype", lambda a: a.update(exclude_mask=torch.zeros(10)), TypeError,
     "exclude_mask must be a bool"),
    ("excl dtype", lambda a: a.update(exclude_index=torch.zeros(4, dtype=torch.int32)), TypeError,
     "exclude_index must be an int64"),
    ("excl len", lambda a: a.update(exclude_index=torch.zeros(3, dtype=torch.long)), ValueError,
     "exclude_index must have shape"),
]
STRUCTURAL = len(BAD)
BAD += [
    ("k type", lambda a: a.update(k=2.0), TypeError, "k must be an int"),
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


def _bad_args(change, device):
    args = _good()
    change(args)
    return {key: (v.to(device) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v)
            for key, v in args.items()}


@pytest.mark.parametrize("backend,device,dtype", F32)
@pytest.mark.parametrize("name,change,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, device, dtype, name, change, exc, match):
    """The public function: a TypeError / ValueError naming the argument, on every backend (the
    checks run before dispatch)."""
    args = _bad_args(change, device)
    q, bank, k = args.pop("queries"), args.pop("bank"), args.pop("k")
    with pytest.raises(exc, match=match):
        acn_kernels.masked_topk(q, bank, k, backend=backend, **args)


@pytest.mark.parametrize("backend,device,dtype", params(OP, dtypes=[torch.float32], backends=COMPILED))
@pytest.mark.parametrize("name,change,exc,match", BAD[:STRUCTURAL], ids=[b[0] for b in BAD[:STRUCTURAL]])
def test_bad_input_registered_op(backend, device, dtype, name, change, exc, match):
    """The registered ops are callable directly and check the structure themselves, naming the
    argument: RuntimeError from the C++ ops (csrc/checks.cpp), the Python check's error from the
    Triton op."""
    args = _bad_args(change, device)
    if backend in ("cpu", "cuda"):
        exc, match = RuntimeError, match.replace("a bool", "bool").replace("an int64", "int64")
    with pytest.raises(exc, match=match):
        _registered(backend)(args["queries"], args["bank"], args["k"], args["exclude_mask"], args["exclude_index"])


@pytest.mark.parametrize("backend,dtype", unsupported_params())
def test_unsupported_dtype_names_every_backend(backend, dtype):
    """An explicit backend that cannot take the dtype raises one error listing every backend
    with its reasons (the capability table), before any kernel runs."""
    q = torch.zeros(2, 3, dtype=dtype)
    with pytest.raises(RuntimeError, match=f"backend='{backend}' cannot run.*{str(dtype)[6:]}") as e:
        acn_kernels.masked_topk(q, q.clone(), 1, backend=backend)
    for name in acn_kernels.dispatch.BACKENDS:
        assert f"{name}: " in str(e.value)


# ---------------------------------------------------------------------------------------------
# Issue 16 (reliability)


def assert_order_contract(d, i):
    """Ascending by (distance, row) among the filled entries; +inf / -1 padding at the tail."""
    fin = i >= 0
    a_d, b_d, a_i, b_i = d[:, :-1], d[:, 1:], i[:, :-1], i[:, 1:]
    pair = fin[:, 1:]
    good = (a_d < b_d) | ((a_d == b_d) & (a_i < b_i))
    assert (good | ~pair).all(), "dists descending, or a tie with the larger row first"


@pytest.mark.parametrize("backend,device,dtype", params(OP, dtypes=[torch.float32, torch.float64]))
def test_issue16_non_contiguous_inputs_keep_the_order_contract(backend, device, dtype):
    """A column-major bank and transposed queries: the same result, bit for bit, as for
    contiguous copies, and ascending by (distance, row). The torch backend selected by distances
    summed in the inputs' layout and reported distances summed in another, which round
    differently (13 of 150 such random cases broke the order)."""
    g = torch.Generator().manual_seed(16)
    for case in range(sized(backend, device, 150, 6)):
        b, n, d = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((2, 9), (8, 200), (2, 70)))
        k = int(torch.randint(1, min(n, 12) + 1, (1,), generator=g))
        q = torch.randn(b, d, generator=g, dtype=torch.float64) * 3
        bank = torch.randn(n, d, generator=g, dtype=torch.float64) * 3
        bank[n // 2:] = bank[: n - n // 2] + 1e-7 * torch.randn(n - n // 2, d, generator=g, dtype=torch.float64)
        q, bank = q.to(dtype=dtype, device=device), bank.to(dtype=dtype, device=device)
        q_t, bank_cm = q.t().contiguous().t(), bank.t().contiguous().t()
        assert not q_t.is_contiguous() and not bank_cm.is_contiguous()
        dd, ii = run_topk(backend, q_t, bank_cm, k)
        assert_order_contract(dd, ii)
        cd, ci = run_topk(backend, q, bank, k)
        assert torch.equal(ii, ci) and torch.equal(dd, cd), f"case {case}: layout changed the result"


def brute_force_topk(q, bank, k, mask=None, excl=None):
    """Every pair's direct-form distance (reference.sq_dist, the reference's arithmetic), then a
    stable sort by distance of the rows in ascending order: the oracle's definition, no filter."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, bank = q.to(dt), bank.to(dt)
    d = reference.sq_dist(q.unsqueeze(1) - bank.unsqueeze(0))
    d = torch.where(torch.isinf(d), torch.finfo(dt).max, d)
    bad = ~torch.isfinite(q).all(1).unsqueeze(1) | ~torch.isfinite(bank).all(1).unsqueeze(0)
    if mask is not None:
        bad = bad | mask.unsqueeze(0)
    if excl is not None:
        bad = bad | (torch.arange(bank.shape[0]).unsqueeze(0) == excl.unsqueeze(1))
    d = d.masked_fill(bad, math.inf)
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    dd = d.gather(1, order)
    return dd, torch.where(torch.isinf(dd), -1, order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random", "ties", "far", "huge"])
def test_issue16_reference_filter_is_exact(monkeypatch, dtype, kind):
    """The torch reference filters with the expanded form (a GEMM) and rescores exactly: bit for
    bit the brute-force direct-form top-k on random data (the filter path), grid data full of
    ties (candidate lists that must grow), data far from the origin (a rounding bound larger
    than the gaps: every row rescored) and norms that overflow (no finite bound); with masks,
    exclusions, and tiles small enough to split queries and rows."""
    calls = {"all": 0}
    real_all = reference._exact_all

    def counting_all(*a, **kw):
        calls["all"] += 1
        return real_all(*a, **kw)

    monkeypatch.setattr(reference, "_exact_all", counting_all)
    g = torch.Generator().manual_seed(61)
    b, n, d, k = 37, 900, 9, 7
    if kind == "ties":
        q, bank = grid_data(b, d, seed=3, levels=3), grid_data(n, d, seed=4, levels=3)
    else:
        q = torch.randn(b, d, generator=g, dtype=torch.float64)
        bank = torch.randn(n, d, generator=g, dtype=torch.float64)
        if kind == "far":  # |q|^2 eps well above the gaps between distances
            off = 1e12 if dtype == torch.float64 else 1e4
            q, bank = q + off, bank + off
        elif kind == "huge":
            bank[::7] *= 1e200 if dtype == torch.float64 else 1e20
    q, bank = q.to(dtype), bank.to(dtype)
    bank[5, 2] = math.nan
    q[3, 0] = math.inf
    mask = torch.rand(n, generator=g) < 0.3
    excl = torch.randint(-1, n, (b,), generator=g)
    for chunk in (1 << 22, 1 << 10):
        got = reference.masked_topk(q, bank, k, mask, excl, chunk_elems=chunk)
        want = brute_force_topk(q, bank, k, mask, excl)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), (kind, chunk)
    # The random data never need the every-row rescoring; far and huge data always do.
    assert (calls["all"] > 0) == (kind in ("far", "huge")), calls


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_issue16_float64_overflow_gives_dbl_max(backend):
    """A finite float64 pair whose distance overflows reports the largest finite value of the
    result dtype, DBL_MAX (the rule of the README), ranked after the finite pairs."""
    if backend == "cpu" and not acn_kernels.backends()["cpu"]:
        pytest.skip("no compiled extension")
    bank = torch.zeros(4, 3, dtype=torch.float64)
    bank[1] = 3e154  # (3e154)^2 * 3 overflows float64
    bank[2] = 1.0
    bank[3, 1] = math.inf
    dd, ii = run_topk(backend, torch.zeros(1, 3, dtype=torch.float64), bank, 4)
    dbl_max = torch.finfo(torch.float64).max
    assert ii.tolist() == [[0, 2, 1, -1]]
    assert dd[0, :3].tolist() == [0.0, 3.0, dbl_max] and math.isinf(dd[0, 3])
