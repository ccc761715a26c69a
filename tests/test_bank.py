"""CodeBank: the batch order of docs/design.md ("The model") against a one-query-at-a-time
reference, end of pass, chunking beyond MAX_K, initial codes, state, devices and errors; and the
counter-based RNG it draws from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from acn_kernels import MAX_K, CodeBank, masked_topk
from acn_kernels.acn import rng
from acn_kernels.acn.bank import Neighbours, initial_codes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_neighbours(bank: CodeBank, index: torch.Tensor, codes: torch.Tensor) -> Neighbours:
    """The design's batch order taken literally: one masked_topk call per query, in order."""
    bank.codes[index] = codes.to(bank.codes.dtype)
    u = rng.uniform(bank.seed, rng.NEIGHBOUR, bank.pass_index, index)
    rows = []
    for q in range(index.shape[0]):
        own = index[q : q + 1]
        cand = masked_topk(bank.codes[own], bank.codes, bank.k, exclude_mask=bank.used,
                           exclude_index=own).indices[0]
        cand = cand[cand >= 0]
        if cand.numel() == 0:  # end of pass: ignore the used mask, keep excluding the own row
            bank.fallbacks += 1
            cand = masked_topk(bank.codes[own], bank.codes, min(bank.k, bank.num_codes - 1),
                               exclude_index=own).indices[0]
            cand = cand[cand >= 0]
        row = cand[int(float(u[q]) * cand.numel())]
        bank.used[row] = True
        rows.append(row)
    out = torch.stack(rows)
    return Neighbours(bank.codes[out], out)


def snapshot(bank: CodeBank) -> dict:
    return {"codes": bank.codes.clone(), "used": bank.used.clone(), **bank.get_extra_state()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def twin_banks(n: int, d: int, k: int, seed: int, device: str, **kw) -> tuple[CodeBank, CodeBank]:
    a = CodeBank(n, d, k, seed, **kw).to(device)
    b = CodeBank(n, d, k, seed).to(device)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n", "d", "k", "batch", "max_search_k", "headroom"), [
    (37, 3, 5, 8, MAX_K, MAX_K),  # the worst-case width K + G - 1; ends with the fallback
    (37, 3, 5, 8, MAX_K, None),   # the default headroom K
    (40, 2, 4, 16, MAX_K, 0),     # no headroom: many queries searched again
    (11, 2, 4, 5, MAX_K, 1),      # tiny bank: candidates capped by N
    (50, 4, 3, 17, 6, MAX_K),     # chunks of max_search_k - k + 1 = 4 queries
    (50, 4, 3, 17, 6, 1),         # chunks and searches again
    (23, 2, 1, 6, 1, None),       # K = 1, chunks of one query
])
def test_neighbours_matches_one_query_reference(n, d, k, batch, max_search_k, headroom, device, monkeypatch):
    gen = torch.Generator().manual_seed(n * 7 + batch)
    a, b = twin_banks(n, d, k, seed=3, device=device, max_search_k=max_search_k, headroom=headroom)
    calls = []
    search = a._candidates
    monkeypatch.setattr(a, "_candidates", lambda q, kk, m, i: calls.append(q.shape[0]) or search(q, kk, m, i))
    chunk = max_search_k - k + 1
    extra = 0  # masked_topk calls beyond one per chunk
    for _ in range(2):
        start = a.fallbacks
        order = torch.randperm(n, generator=gen).to(device)
        for s in range(0, n, batch):
            idx = order[s : s + batch]
            # Low-resolution codes: many exact distance ties, resolved by row index.
            codes = torch.randint(-2, 3, (idx.numel(), d), generator=gen).float().to(device)
            before, chunks = len(calls), -(-idx.numel() // chunk)
            got = a.neighbours(idx, codes)
            # At most one more search per chunk (the queries searched again, together), plus
            # one for the batch's fallbacks.
            assert chunks <= len(calls) - before <= 2 * chunks + 1
            extra += len(calls) - before - chunks
            want = reference_neighbours(b, idx, codes)
            assert torch.equal(got.rows, want.rows)
            assert torch.equal(got.codes, want.codes)
            assert_same_state(snapshot(a), snapshot(b))
        # One pick per example; only a fallback pick repeats a used row.
        assert int(a.used.sum()) == n - (a.fallbacks - start)
        a.new_pass()
        b.new_pass()
    assert a.pass_index == 2
    if headroom in (0, 1):
        assert extra > a.fallbacks  # the searches again were exercised
    if headroom == MAX_K and max_search_k == MAX_K:
        assert len(calls) == 2 * -(-n // batch) + a.fallbacks  # one search per batch (+ fallbacks)


def test_one_pass_is_a_derangement_except_the_fallback():
    n, batch = 40, 7
    bank = CodeBank(n, 4, k=5, seed=1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    picks = torch.empty(n, dtype=torch.long)
    for s in range(0, n, batch):
        idx = order[s : s + batch]
        picks[idx] = bank.neighbours(idx, torch.randn(idx.numel(), 4)).rows
    assert bool((picks != torch.arange(n)).all())  # never the own row
    # Every pick is distinct except at most one fallback pick, which repeats a used row.
    assert torch.unique(picks).numel() >= n - bank.fallbacks
    assert bank.fallbacks <= 1
    assert bool(bank.used[picks].all())


def test_end_of_pass_fallback_is_counted():
    bank = CodeBank(3, 2, k=2, seed=0)
    # Queries 0 and 1 may pick each other or row 2; after they do, row 2's query finds the rows it
    # could use taken (if its own row is the one left), which forces the fallback, or not.
    bank.used[:] = torch.tensor([True, True, False])
    res = bank.neighbours(torch.tensor([2]), torch.zeros(1, 2))
    assert bank.fallbacks == 1 and int(res.rows[0]) in (0, 1)
    res = bank.neighbours(torch.tensor([0]), torch.zeros(1, 2))  # row 2 is still free
    assert bank.fallbacks == 1 and int(res.rows[0]) == 2


def test_picks_do_not_depend_on_batch_size():
    n = 30
    one, big = CodeBank(n, 3, seed=5), CodeBank(n, 3, seed=5)
    codes = torch.randn(n, 3)
    idx = torch.arange(n)
    # Writing all codes first makes the batches see the same bank; then batch order == index order.
    one.update(idx, codes)
    big.update(idx, codes)
    rows_one = torch.cat([one.neighbours(idx[i : i + 1], codes[i : i + 1]).rows for i in range(n)])
    rows_big = torch.cat([big.neighbours(idx[s : s + 8], codes[s : s + 8]).rows for s in range(0, n, 8)])
    assert torch.equal(rows_one, rows_big)


def test_search_is_side_effect_free_and_ignores_used():
    bank = CodeBank(20, 3, k=4)
    bank.used[:10] = True
    before = snapshot(bank)
    q = torch.randn(5, 3)
    res = bank.search(q)
    assert_same_state(before, snapshot(bank))
    want = masked_topk(q, bank.codes, 4)
    assert torch.equal(res.indices, want.indices)
    assert bank.search(q, 7, exclude_index=torch.full((5,), 3)).indices.shape == (5, 7)
    assert not bool((bank.search(q, 7, exclude_index=torch.full((5,), 3)).indices == 3).any())


def test_update_only_writes_codes():
    bank = CodeBank(10, 2)
    before = snapshot(bank)
    bank.update(torch.tensor([4, 1]), torch.ones(2, 2, dtype=torch.float64, requires_grad=True))
    after = snapshot(bank)
    assert torch.equal(after["codes"][[4, 1]], torch.ones(2, 2))
    after["codes"][[4, 1]] = before["codes"][[4, 1]]
    assert_same_state(before, after)


def test_state_dict_round_trip():
    a = CodeBank(16, 3, k=2, seed=9)
    idx = torch.arange(6)
    a.neighbours(idx, torch.randn(6, 3))
    a.new_pass()
    a.neighbours(idx[:3], torch.randn(3, 3))
    b = CodeBank(16, 3, k=2, seed=0)
    b.load_state_dict(a.state_dict())
    assert_same_state(snapshot(a), snapshot(b))
    assert b.pass_index == 1 and b.seed == 9
    with pytest.raises(ValueError, match="k=2"):
        CodeBank(16, 3, k=3).load_state_dict(a.state_dict())


@pytest.mark.parametrize(("index", "codes", "err", "match"), [
    (torch.tensor([0, 1]), torch.zeros(2, 4), ValueError, "code_dim=3"),
    (torch.tensor([0, 10]), torch.zeros(2, 3), ValueError, r"index values must lie in \[0, num_codes=10\)"),
    (torch.tensor([-1, 2]), torch.zeros(2, 3), ValueError, "index values"),
    (torch.tensor([3, 5, 3]), torch.zeros(3, 3), ValueError, "duplicate"),
    (torch.tensor([0, 1], dtype=torch.int32), torch.zeros(2, 3), TypeError, "int64"),
    (torch.tensor([0, 1]), torch.zeros(3, 3), ValueError, "3 rows but index has 2"),
    (torch.tensor([0, 1]), torch.tensor([[0.0, 1, 2], [float("nan"), 0, 0]]), ValueError, "finite"),
])
def test_bad_input_raises_and_leaves_bank_unchanged(index, codes, err, match):
    bank = CodeBank(10, 3)
    bank.used[4] = True
    before = snapshot(bank)
    with pytest.raises(err, match=match):
        bank.neighbours(index, codes)
    assert_same_state(before, snapshot(bank))


def test_failure_inside_the_search_restores_the_bank(monkeypatch):
    bank = CodeBank(10, 3)
    before = snapshot(bank)

    def boom(*args, **kwargs):
        raise RuntimeError("search failed")

    monkeypatch.setattr(bank, "_candidates", boom)
    with pytest.raises(RuntimeError, match="search failed"):
        bank.neighbours(torch.tensor([1, 2]), torch.ones(2, 3))
    assert_same_state(before, snapshot(bank))


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_codes"):
        CodeBank(1, 3)
    with pytest.raises(ValueError, match="k must"):
        CodeBank(10, 3, k=0)
    with pytest.raises(ValueError, match="max_search_k"):
        CodeBank(10, 3, k=5, max_search_k=4)
    with pytest.raises(ValueError, match="headroom"):
        CodeBank(10, 3, headroom=-1)


# ----------------------------------------------------------------------------------------------
# The counter-based RNG


def test_mix_matches_python_reference():
    words = [0, 1, 2**63 - 1, -1, -(2**63), 12345678901234, -987654321]
    got = rng.mix(torch.tensor(words))
    for g, w in zip(got.tolist(), words, strict=True):
        assert g % 2**64 == rng.mix_int(w)
    # SplitMix64's published first output for state 0 after one increment of the golden gamma.
    assert rng.mix_int(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF


def test_draws_depend_only_on_their_coordinates():
    idx = torch.tensor([5, 17, 2, 900])
    u = rng.uniform(3, rng.NEIGHBOUR, 2, idx)
    assert torch.equal(u[1:3], rng.uniform(3, rng.NEIGHBOUR, 2, idx[1:3]))
    assert not torch.equal(u, rng.uniform(3, rng.NEIGHBOUR, 1, idx))
    assert not torch.equal(u, rng.uniform(4, rng.NEIGHBOUR, 2, idx))
    assert not torch.equal(u, rng.uniform(3, rng.EPS, 2, idx))
    z = rng.normal(3, rng.EPS, 2, idx, 6)
    assert z.shape == (4, 6) and z.dtype == torch.float32
    assert torch.equal(z[2:], rng.normal(3, rng.EPS, 2, idx[2:], 6))
    big = rng.normal(0, rng.EPS, 0, torch.arange(4000), 8, torch.float64)
    assert abs(float(big.mean())) < 0.03 and abs(float(big.std()) - 1) < 0.03
    uu = rng.uniform(0, rng.NEIGHBOUR, 0, torch.arange(20000))
    assert float(uu.min()) >= 0 and float(uu.max()) < 1 and abs(float(uu.mean()) - 0.5) < 0.01
    perm = rng.permutation(1, 4, 50)
    assert torch.equal(torch.sort(perm).values, torch.arange(50))
    assert not torch.equal(perm, rng.permutation(1, 5, 50))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_draws_agree_across_devices():
    idx = torch.arange(1000)
    assert torch.equal(rng.uniform(1, 2, 3, idx), rng.uniform(1, 2, 3, idx.cuda()).cpu())
    torch.testing.assert_close(rng.normal(1, 2, 3, idx, 4), rng.normal(1, 2, 3, idx.cuda(), 4).cpu())


# ----------------------------------------------------------------------------------------------
# Issue 9: one bank construction, counter-based initial codes


@pytest.mark.parametrize("device", DEVICES)
def test_initial_codes_are_counter_based(device):
    """Row i starts as the N(0, 1) draw of (seed, i), whatever the rows stored, so a shard of a
    sharded bank starts as the same rows of the whole one (and a one-rank run as one process)."""
    bank = CodeBank(50, 6, seed=7, device=device)
    assert bank.codes.device.type == device and bank.codes.dtype == torch.float32
    assert torch.equal(bank.codes, rng.normal(7, rng.BANK_INIT, 0, torch.arange(50, device=device), 6))
    assert torch.equal(bank.codes, initial_codes(7, torch.arange(50, device=device), 6))
    shard = CodeBank(50, 6, seed=7, device=device, shard=(20, 35))
    assert (shard.start, shard.end) == (20, 35) and shard.used.shape == (50,)
    assert torch.equal(shard.codes, bank.codes[20:35])
    assert not torch.equal(CodeBank(50, 6, seed=8, device=device).codes, bank.codes)
    z = bank.codes.double()
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1


@pytest.mark.parametrize("shard", [(-1, 3), (4, 3), (0, 11)])
def test_bad_shard(shard):
    with pytest.raises(ValueError, match="shard must be"):
        CodeBank(10, 3, shard=shard)


# ----------------------------------------------------------------------------------------------
# Issue 16: a bank never holds a non-finite code; constructor and index errors name the argument


@pytest.mark.parametrize("codes", [
    torch.tensor([[0.0, 1, 2], [float("nan"), 0, 0]]),
    torch.tensor([[0.0, 1, 2], [0, float("-inf"), 0]]),
    torch.tensor([[0.0, 1, 2], [0, 0, 1e39]], dtype=torch.float64),  # finite, but inf in float32
], ids=["nan", "inf", "float64-overflow"])
@pytest.mark.parametrize("method", ["update", "neighbours"])
def test_non_finite_codes_are_refused(codes, method):
    bank = CodeBank(10, 3)
    before = snapshot(bank)
    with pytest.raises(ValueError, match="codes must be finite in the bank's dtype torch.float32: row 1"):
        getattr(bank, method)(torch.tensor([4, 7]), codes)
    assert_same_state(before, snapshot(bank))
    assert bool(torch.isfinite(bank.codes).all())


def test_non_finite_state_dict_is_refused():
    state = CodeBank(10, 3).state_dict()
    state["codes"][2, 1] = float("nan")
    bank = CodeBank(10, 3, seed=1)
    with pytest.raises(ValueError, match="codes holds NaN or inf"):
        bank.load_state_dict(state)
    assert bool(torch.isfinite(bank.codes).all())


def test_no_finite_candidate_is_a_clear_error():
    """Only a direct write into the buffer can leave a query without a finite candidate; the
    error says so (it once was a bare IndexError) and the call leaves the bank as it was."""
    bank = CodeBank(6, 2)
    bank.codes[1:] = float("nan")
    before = bank.codes[0].clone()
    with pytest.raises(RuntimeError, match=r"query 0 of the batch \(row 0\) has no candidate"):
        bank.neighbours(torch.tensor([0]), torch.zeros(1, 2))
    assert torch.equal(bank.codes[0], before) and not bool(bank.used.any()) and bank.fallbacks == 0


@pytest.mark.parametrize(("args", "kwargs", "err", "match"), [
    ((10.5, 4), {}, TypeError, "num_codes must be an int, got float"),
    ((True, 4), {}, TypeError, "num_codes must be an int, got bool"),
    ((10, 4.0), {}, TypeError, "code_dim must be an int, got float"),
    ((10, 0), {}, ValueError, "code_dim must be >= 1, got 0"),
    ((10, 4), {"k": 2.5}, TypeError, "k must be an int"),
    ((10, 4), {"k": 2000}, ValueError, "k=2000 is above"),
    ((10, 4), {"seed": "1"}, TypeError, "seed must be an int, got str"),
    ((10, 4), {"seed": 1.0}, TypeError, "seed must be an int, got float"),
    ((10, 4), {"max_search_k": 9.0}, TypeError, "max_search_k must be an int"),
    ((10, 4), {"headroom": 1.5}, TypeError, "headroom must be an int"),
    ((10, 4), {"shard": (0.0, 5)}, TypeError, r"shard\[0\] must be an int"),
    ((10, 4), {"shard": 5}, TypeError, "shard must be a"),
])
def test_constructor_arguments_are_checked(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        CodeBank(*args, **kwargs)


def test_constructor_takes_any_integer():
    import numpy as np

    bank = CodeBank(np.int64(10), torch.tensor(3), k=np.int32(2), seed=np.uint8(4), headroom=np.int16(1))
    assert (bank.num_codes, bank.code_dim, bank.k, bank.seed, bank.headroom) == (10, 3, 2, 4, 1)
    assert all(type(v) is int for v in (bank.num_codes, bank.code_dim, bank.k, bank.seed, bank.headroom))


@pytest.mark.parametrize(("index", "err", "match"), [
    (__import__("numpy").array([0, 1]), TypeError,
     r"index must be a torch.Tensor, got numpy.ndarray; use torch.as_tensor\(index\)"),
    ([0, 1], TypeError, r"index must be a torch.Tensor, got list"),
    (torch.tensor([0, 1], dtype=torch.int32), TypeError, r"int64 tensor, got torch.int32; use index.long\(\)"),
    (torch.tensor([[0, 1]]), ValueError, r"index must be 1-D \[B\], got shape \(1, 2\)"),
])
def test_index_errors_say_what_is_wrong(index, err, match):
    bank = CodeBank(10, 3)
    with pytest.raises(err, match=match):
        bank.update(index, torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"codes must be a torch.Tensor, got numpy.ndarray"):
        bank.neighbours(torch.tensor([0, 1]), __import__("numpy").zeros((2, 3), dtype="float32"))


# ----------------------------------------------------------------------------------------------
# Issue 12: the fused batch walk, the capturable mode and the device-side checks


@pytest.fixture
def no_host_reads(monkeypatch):
    """Within the test, every Python-level read of a tensor's values on the host raises (a CPU
    stand-in for torch.cuda.set_sync_debug_mode("error"), which only a GPU run can use)."""

    def read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    def install():
        for name in ("__bool__", "__int__", "__float__", "item", "tolist", "numpy", "cpu", "nonzero"):
            monkeypatch.setattr(torch.Tensor, name, read)

    return install


def defer_checks(monkeypatch, bank: CodeBank) -> CodeBank:
    """Make a CPU bank check values as a CUDA bank does (on the device, deferred)."""
    monkeypatch.setattr(bank, "_defers_checks", lambda: True)
    return bank


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n", "d", "k", "batch"), [
    (37, 3, 5, 8),    # ends with the fallback
    (40, 2, 4, 16),   # much competition within a batch
    (11, 2, 4, 5),    # tiny bank: candidates capped by N
    (23, 2, 1, 6),    # K = 1
])
def test_capturable_matches_one_query_reference(n, d, k, batch, device, monkeypatch):
    """A capturable bank (one search of K + B - 1, the fallback lists of every query, the fused
    walk; exactly two masked_topk calls per batch) picks what the one-query reference picks."""
    gen = torch.Generator().manual_seed(n + batch)
    a, b = twin_banks(n, d, k, seed=4, device=device, capturable=True)
    calls = []
    search = a._candidates
    monkeypatch.setattr(a, "_candidates", lambda q, kk, m, i: calls.append(kk) or search(q, kk, m, i))
    for _ in range(2):
        order = torch.randperm(n, generator=gen).to(device)
        for s in range(0, n, batch):
            idx = order[s : s + batch]
            codes = torch.randint(-2, 3, (idx.numel(), d), generator=gen).float().to(device)
            calls.clear()
            got = a.neighbours(idx, codes)
            assert calls == [min(k + idx.numel() - 1, n), min(k, n - 1)]
            want = reference_neighbours(b, idx, codes)
            assert torch.equal(got.rows, want.rows) and torch.equal(got.codes, want.codes)
            assert_same_state(snapshot(a), snapshot(b))
        a.new_pass()
        b.new_pass()
    assert a.fallbacks == b.fallbacks


def test_capturable_end_of_pass_fallback():
    bank = CodeBank(3, 2, k=2, seed=0, capturable=True)
    bank.used[:] = torch.tensor([True, True, False])
    res = bank.neighbours(torch.tensor([2]), torch.zeros(1, 2))  # rows 0 and 1 used, 2 its own
    assert bank.fallbacks == 1 and int(res.rows[0]) in (0, 1)
    assert bank.used.tolist() == [True, True, False]  # a fallback pick takes nothing
    res = bank.neighbours(torch.tensor([0, 1]), torch.zeros(2, 2))  # 0 takes row 2; 1 falls back
    assert bank.fallbacks == 2 and int(res.rows[0]) == 2 and int(res.rows[1]) in (0, 2)


def test_capturable_reads_nothing_on_the_host(monkeypatch, no_host_reads):
    bank = defer_checks(monkeypatch, CodeBank(50, 4, k=3, seed=2, capturable=True))
    idx = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    codes = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    ref = CodeBank(50, 4, k=3, seed=2)
    want = [ref.neighbours(idx[s : s + 10], codes[s : s + 10]).rows for s in range(0, 50, 10)]
    no_host_reads()
    got = [bank.neighbours(idx[s : s + 10], codes[s : s + 10]).rows for s in range(0, 50, 10)]
    monkeypatch.undo()
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert bank.fallbacks == ref.fallbacks


def test_capturable_compiles_whole(monkeypatch):
    """With its checks on the device (as on a CUDA bank), a capturable bank's neighbours() is one
    graph for torch.compile(fullgraph=True), and picks what the eager bank picks."""
    torch._dynamo.reset()
    bank = defer_checks(monkeypatch, CodeBank(40, 4, k=3, seed=1, capturable=True))
    ref = CodeBank(40, 4, k=3, seed=1)
    step = torch.compile(bank.neighbours, fullgraph=True)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        idx = torch.randperm(40, generator=gen)
        for s in range(0, 40, 8):
            codes = torch.randint(-1, 2, (8, 4), generator=gen).float()
            got, want = step(idx[s : s + 8], codes), ref.neighbours(idx[s : s + 8], codes)
            assert torch.equal(got.rows, want.rows) and torch.equal(got.codes, want.codes)
        bank.new_pass()
        ref.new_pass()
    assert torch.equal(bank.codes, ref.codes) and bank.fallbacks == ref.fallbacks


def test_capturable_batch_limit():
    bank = CodeBank(20, 2, k=3, max_search_k=6, capturable=True)
    bank.neighbours(torch.arange(4), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"at most max_search_k - k \+ 1 = 4 queries per call, got 5"):
        bank.neighbours(torch.arange(4, 9), torch.randn(5, 2))


def test_collapsed_codes_cost_one_more_search(monkeypatch):
    """Every fresh code equal (an untrained encoder): most queries lose their whole list, yet the
    batch costs two masked_topk calls, and the picks are the reference's."""
    a, b = twin_banks(200, 3, 5, seed=1, device="cpu", headroom=0)
    calls = []
    search = a._candidates
    monkeypatch.setattr(a, "_candidates", lambda q, kk, m, i: calls.append((q.shape[0], kk)) or search(q, kk, m, i))
    idx = torch.randperm(200, generator=torch.Generator().manual_seed(2))[:64]
    codes = torch.full((64, 3), 0.5)
    got = a.neighbours(idx, codes)
    assert torch.equal(got.rows, reference_neighbours(b, idx, codes).rows)
    assert len(calls) == 2 and calls[0] == (64, 5) and calls[1][1] == 5 + calls[1][0] - 1


BAD_VALUES = [
    (torch.tensor([0, 10]), torch.zeros(2, 3), r"index values must lie in \[0, num_codes=10\), got min 0, max 10"),
    (torch.tensor([-1, 2]), torch.zeros(2, 3), r"got min -1, max 2"),
    (torch.tensor([3, 5, 3]), torch.zeros(3, 3), "duplicate"),
    (torch.tensor([0, 1]), torch.tensor([[0.0, 1, 2], [float("nan"), 0, 0]]), "finite"),
]


def bank_state(bank: CodeBank) -> tuple:
    return bank.codes.clone(), bank.used.clone(), int(bank._fallback_count), bank.pass_index


def same_state(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("index", "codes", "match"), BAD_VALUES)
def test_device_checks_raise_in_the_call(index, codes, match, monkeypatch):
    """A CUDA bank (here a CPU bank checking as one does) finds bad values on the device and
    raises with its first host read, in the same call, with the CPU's message."""
    bank = defer_checks(monkeypatch, CodeBank(10, 3))
    bank.used[4] = True
    before = bank_state(bank)
    with pytest.raises(ValueError, match=match):
        bank.neighbours(index, codes)
    assert same_state(before, bank_state(bank))


@pytest.mark.parametrize(("index", "codes", "match"), BAD_VALUES)
def test_capturable_device_checks_raise_later(index, codes, match, monkeypatch):
    """A capturable CUDA bank never reads the device: a bad batch changes nothing and its error
    is raised, once, where the bank is next read on the host."""
    bank = defer_checks(monkeypatch, CodeBank(10, 3, capturable=True))
    bank.used[4] = True
    before = bank_state(bank)
    bank.neighbours(index, codes)  # no error yet
    assert same_state(before, bank_state(bank))
    bank.neighbours(torch.tensor([0, 1]), torch.zeros(2, 3) + float("inf"))  # a second error is not kept
    with pytest.raises(ValueError, match=match):
        bank.raise_deferred_errors()
    bank.raise_deferred_errors()  # raised once
    for read in (lambda: bank.new_pass(), lambda: bank.fallbacks, lambda: bank.state_dict()):
        bank.neighbours(index, codes)
        with pytest.raises(ValueError, match=match):
            read()
    assert bank.pass_index == 0
    # The bad batches took nothing: a good one after them picks what a fresh bank picks.
    fresh = CodeBank(10, 3)
    fresh.used[4] = True
    idx, good = torch.tensor([7, 2, 9]), torch.randn(3, 3)
    assert torch.equal(bank.neighbours(idx, good).rows, fresh.neighbours(idx, good).rows)


def test_triton_bank_walks_on_the_automatic_backend():
    bank = CodeBank(30, 3, backend="triton")
    assert bank._walk_backend is None
    assert CodeBank(30, 3, backend="torch")._walk_backend == "torch"


def test_walk_backends_agree():
    """The bank's result does not depend on the walk's backend (the "torch" reference loop)."""
    a, b = CodeBank(40, 3, seed=6), CodeBank(40, 3, seed=6, backend="torch")
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    for s in range(0, 40, 12):
        codes = torch.randint(-1, 2, (min(12, 40 - s), 3)).float()
        assert torch.equal(a.neighbours(idx[s : s + 12], codes).rows, b.neighbours(idx[s : s + 12], codes).rows)


requires_cuda_backend = pytest.mark.skipif(
    not (torch.cuda.is_available() and __import__("acn_kernels").backends()["cuda"]),
    reason="needs a GPU and _C built with CUDA")


def _acn_step_parts(batch: int, device: str = "cuda", capturable: bool = True):
    """The default ACN built by the training config (its bank capturable) on ``device``, a pass of
    six batches of random binary digits, and the training loop's own step
    (:func:`acn_kernels.acn.train.train_step`: encode, bank write, search, walk, prior, KL,
    decoder, backward, optimiser) on a batch of indices, returning the batch's sums [4] on the
    device. The optimiser: Adam(capturable=True) on a GPU (a CUDA graph needs it); SGD on the CPU,
    whose Adam reads its step count on the host and cannot be capturable."""
    from acn_kernels.acn.config import TrainConfig
    from acn_kernels.acn.train import train_step

    n = 6 * batch  # a pass of six batches
    config = TrainConfig(batch_size=batch, capturable=capturable, device=device)
    model = config.build(n, (1, 28, 28)).to(device)
    params = model.parameters()
    opt = (torch.optim.Adam(params, lr=config.lr, capturable=True) if device == "cuda"
           else torch.optim.SGD(params, lr=0.1))
    x = (torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1)) > 0.8).float().to(device)
    order = rng.permutation(0, 0, n, device)

    def step(idx: torch.Tensor) -> torch.Tensor:
        return train_step(model, opt, x[idx], idx)

    return model, order, step


def test_acn_step_dry_run_reads_nothing_on_the_host(monkeypatch, no_host_reads):
    """The GPU tests' step on the CPU, with the bank checking on the device as a CUDA bank does:
    whole steps that read no tensor on the host (the CPU stand-in for
    torch.cuda.set_sync_debug_mode("error")), equal to the same steps on a bank that checks at
    once and searches as usual."""
    ref_model, order, ref_step = _acn_step_parts(16, "cpu", capturable=False)
    want = [ref_step(order[s : s + 16]) for s in range(0, 48, 16)]
    model, order, step = _acn_step_parts(16, "cpu")
    defer_checks(monkeypatch, model.bank)
    no_host_reads()
    got = [step(order[s : s + 16]) for s in range(0, 48, 16)]
    monkeypatch.undo()
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert torch.equal(model.bank.used, ref_model.bank.used) and torch.equal(model.bank.codes, ref_model.bank.codes)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)


@requires_cuda_backend
@pytest.mark.cuda
@pytest.mark.parametrize("batch", [128, 1000])
def test_gpu_step_without_host_synchronisation(batch):
    """A whole ACN training step (encode, bank write, search, walk, prior, KL, decoder, backward,
    Adam) on a capturable bank never synchronises with the host."""
    model, order, step = _acn_step_parts(batch)
    step(order[:batch])  # warm-up: lazy initialisation (cuBLAS handles, Adam state) may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in range(batch, 3 * batch, batch):
            step(order[s : s + batch])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    model.bank.raise_deferred_errors()
    assert int(model.bank.used.sum()) == 3 * batch - model.bank.fallbacks


@requires_cuda_backend
@pytest.mark.cuda
def test_gpu_step_in_a_cuda_graph():
    """The same step captured once in a CUDA graph and replayed over a pass's batches gives the
    eager step's sums, picks, bank and weights (the graph bakes the pass index in: capture again
    after new_pass)."""
    batch = 128
    eager_model, order, eager_step = _acn_step_parts(batch)
    model, _, step = _acn_step_parts(batch)
    static_idx = order[:batch].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graphs requires
        step(static_idx)
    torch.cuda.current_stream().wait_stream(side)
    eager_step(static_idx)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_sums = step(static_idx)
    for s in range(batch, 5 * batch, batch):
        static_idx.copy_(order[s : s + batch])
        graph.replay()
        want = eager_step(order[s : s + batch])
        torch.testing.assert_close(static_sums, want)
    assert torch.equal(model.bank.used, eager_model.bank.used)
    torch.testing.assert_close(model.bank.codes, eager_model.bank.codes)
    for p, q in zip(model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(p, q)


# ----------------------------------------------------------------------------------------------
# Issue 13: a real drop-in (write and pick apart, from_codes, bare-code checkpoints, the pass
# overrun warning, one naming, index-less data sets)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("max_search_k", "headroom"), [(MAX_K, None), (6, 0)])
def test_update_then_pick_equals_neighbours(device, max_search_k, headroom):
    """Writing in one place and picking in another resolves exactly as the one call, over passes
    that end in the fallback, with chunking and repeated searches."""
    n, d, k, batch = 41, 3, 3, 9
    gen = torch.Generator().manual_seed(13)
    a, b = twin_banks(n, d, k, seed=4, device=device, max_search_k=max_search_k, headroom=headroom)
    b.max_search_k, b.headroom = a.max_search_k, a.headroom
    for _ in range(2):
        order = torch.randperm(n, generator=gen).to(device)
        for s in range(0, n, batch):
            idx = order[s : s + batch]
            codes = torch.randint(-2, 3, (idx.numel(), d), generator=gen).float().to(device)
            want = a.neighbours(idx, codes)
            b.update(idx, codes)
            got = b.pick(idx)
            assert torch.equal(got.indices, want.indices) and torch.equal(got.codes, want.codes)
            assert_same_state(snapshot(a), snapshot(b))
        a.new_pass()
        b.new_pass()
    # The end-of-pass fallback: every row but the query's own is used.
    for bank in (a, b):
        bank.used.fill_(True)
        bank.used[17] = False
    own = torch.tensor([17], device=device)
    want = a.neighbours(own, a.codes[own])
    got = b.pick(own)
    assert torch.equal(got.indices, want.indices) and a.fallbacks == b.fallbacks > 0
    assert_same_state(snapshot(a), snapshot(b))


def test_pick_uses_the_stored_codes():
    """pick() queries with what the rows hold: rows never written use their initial codes, and
    the pick is the design's one-query-at-a-time choice for them."""
    a, b = twin_banks(30, 4, 3, seed=2, device="cpu")
    idx = torch.tensor([7, 3, 21, 0])
    got = a.pick(idx)
    want = reference_neighbours(b, idx, b.codes[idx].clone())
    assert torch.equal(got.indices, want.indices)
    assert_same_state(snapshot(a), snapshot(b))


def test_pick_errors_leave_the_bank_unchanged():
    bank = CodeBank(10, 3)
    with torch.no_grad():  # update() refuses non-finite codes: only a direct write stores one
        bank.codes[5, 1] = float("inf")
    before = snapshot(bank)
    with pytest.raises(ValueError, match="stored codes of index must be finite"):
        bank.pick(torch.tensor([2, 5]))
    with pytest.raises(ValueError, match="duplicate"):
        bank.pick(torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="index values"):
        bank.pick(torch.tensor([10]))
    with pytest.raises(TypeError, match="int64"):
        bank.pick(torch.tensor([1], dtype=torch.int32))
    assert_same_state(before, snapshot(bank))


@pytest.mark.parametrize("device", DEVICES)
def test_from_codes(device):
    old = torch.randn(25, 6, dtype=torch.float64, device=device)
    bank = CodeBank.from_codes(old, k=4, seed=11, headroom=0)
    assert (bank.num_codes, bank.code_dim, bank.k, bank.seed, bank.headroom) == (25, 6, 4, 11, 0)
    assert bank.codes.dtype == torch.float32 and bank.codes.device == old.device
    assert torch.equal(bank.codes, old.float()) and not bool(bank.used.any()) and bank.pass_index == 0
    old.zero_()  # copied, not shared
    assert bool(bank.codes.abs().sum() > 0)
    # It picks like a bank that reached the same codes by update().
    same = CodeBank(25, 6, k=4, seed=11, device=device)
    same.update(torch.arange(25, device=device), bank.codes)
    idx = torch.tensor([3, 9, 1], device=device)
    assert torch.equal(bank.pick(idx).indices, same.pick(idx).indices)
    for bad, err in [(torch.zeros(5), TypeError), (torch.zeros(5, 2, dtype=torch.int64), TypeError),
                     (torch.zeros(1, 3), ValueError)]:
        with pytest.raises(err, match="codes|num_codes"):
            CodeBank.from_codes(bad)


def test_bare_codes_state_dict_loads():
    """An old checkpoint's bare {"codes": ...} loads: the codes replace the bank's; the used mask,
    pass index, fallback count, K and seed the state lacks keep the bank's values. A state with
    neither is still an error."""
    bank = CodeBank(12, 3, k=2, seed=5)
    bank.neighbours(torch.tensor([0, 4]), torch.randn(2, 3))
    bank.new_pass()
    bank.neighbours(torch.tensor([1]), torch.randn(1, 3))
    before = snapshot(bank)
    old = torch.randn(12, 3, dtype=torch.float64)
    bank.load_state_dict({"codes": old})
    after = snapshot(bank)
    assert torch.equal(after.pop("codes"), old.float())
    before.pop("codes")
    assert_same_state(before, after)
    used = torch.zeros(12, dtype=torch.bool)
    used[3] = True
    bank.load_state_dict({"codes": old, "used": used})
    assert torch.equal(bank.used, used) and bank.pass_index == 1
    with pytest.raises(RuntimeError, match="size mismatch"):
        bank.load_state_dict({"codes": torch.zeros(11, 3)})
    with pytest.raises(RuntimeError, match="Missing key"):
        bank.load_state_dict({})


def test_old_model_checkpoint_without_bank_state_loads():
    from acn_kernels.acn.models import build_model

    model = build_model("acn", num_codes=20, code_dim=4, components=2)
    state = {key: v for key, v in model.state_dict().items() if key not in ("bank.used", "bank._extra_state")}
    state["bank.codes"] = torch.randn(20, 4)
    fresh = build_model("acn", num_codes=20, code_dim=4, components=2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.bank.codes, state["bank.codes"])


def test_forgotten_new_pass_warns_and_a_proper_pass_does_not():
    import warnings

    from acn_kernels.acn import PassOverrunWarning

    gen = torch.Generator().manual_seed(1)
    small = CodeBank(3, 2, k=2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # complete passes, end-of-pass fallbacks included, never warn
        for _ in range(12):
            for i in torch.randperm(3, generator=gen):
                small.neighbours(i.reshape(1), torch.randn(1, 2, generator=gen))
            small.new_pass()
    assert small.fallbacks >= 1
    n = 16
    bank = CodeBank(n, 2, k=3, seed=0)
    order = torch.randperm(n, generator=gen)
    for s in range(0, n, 5):
        bank.neighbours(order[s : s + 5], torch.randn(order[s : s + 5].numel(), 2))
    with pytest.warns(PassOverrunWarning, match=r"pass 0: 5 picks asked but only [01] of 16 rows"):
        bank.neighbours(order[:5], torch.randn(5, 2))  # new_pass() forgotten
    bank.update(order[:5], torch.randn(5, 2))
    with pytest.warns(PassOverrunWarning, match="new_pass"):
        bank.pick(order[:5])


def test_one_naming_for_result_fields():
    from acn_kernels.acn.models import build_model

    bank = CodeBank(10, 2, k=2)
    nb = bank.neighbours(torch.tensor([1, 2]), torch.randn(2, 2))
    assert nb._fields == ("codes", "indices") and nb.rows is nb.indices
    assert bank.search(torch.randn(3, 2))._fields == ("dists", "indices")
    model = build_model("acn", num_codes=10, code_dim=2, components=1)
    terms = model(torch.zeros(2, 1, 28, 28), torch.tensor([0, 5]))
    assert terms.indices.shape == (2,) and terms.rows is terms.indices


def test_search_returns_squared_distances():
    bank = CodeBank.from_codes(torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]]), k=2)
    res = bank.search(torch.tensor([[0.0, 0.0]]))
    assert res.indices.tolist() == [[0, 2]]
    res = bank.search(torch.tensor([[0.0, 0.0]]), 3)
    assert res.dists.tolist() == [[0.0, 1.0, 25.0]]  # 25 = 5^2, not 5


def test_indexed_dataset_with_a_dataloader():
    from torch.utils.data import DataLoader, IterableDataset, TensorDataset

    from acn_kernels.acn import IndexedDataset

    x, y = torch.randn(11, 3), torch.arange(11) * 10
    pairs = IndexedDataset(TensorDataset(x, y))
    assert len(pairs) == 11
    seen = []
    for idx, xb, yb in DataLoader(pairs, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert idx.dtype == torch.int64 and torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])
        seen.append(idx)
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(11))
    # A bare-tensor item is kept whole; numpy integer indices work.
    single = IndexedDataset(list(x))
    i, item = single[np.int64(3)]
    assert i == 3 and torch.equal(item, x[3])
    # The bank takes the loader's index as is.
    bank = CodeBank(11, 3, k=2)
    idx, xb, _ = next(iter(DataLoader(pairs, batch_size=4)))
    assert bank.neighbours(idx, xb).indices.shape == (4,)

    class Stream(IterableDataset):
        def __iter__(self):
            yield from x

    with pytest.raises(TypeError, match="IterableDataset"):
        IndexedDataset(Stream())
    with pytest.raises(TypeError, match="map-style"):
        IndexedDataset(5)


def test_port_example_trains_without_overrunning_a_pass():
    """python/port_example.py (docs/acn.md, "Porting an existing ACN codebase"): two passes of the
    port, every pass closed by new_pass (a PassOverrunWarning fails the test), finite results;
    and one step of the original it was ported from."""
    import importlib.util
    import pathlib
    import warnings

    path = pathlib.Path(__file__).resolve().parents[1] / "python" / "port_example.py"
    spec = importlib.util.spec_from_file_location("port_example", path)
    port = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(port)
    from acn_kernels.acn import PassOverrunWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", category=PassOverrunWarning)
        out = port.main(["--epochs", "2"])
    assert all(np.isfinite(v) for v in out.values()) and out["test_kl"] > 0
    original = port.main(["--original", "--steps", "1"])
    assert all(np.isfinite(v) for v in original.values())
