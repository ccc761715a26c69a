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
    for _ in range(2):
        start = a.fallbacks
        order = torch.randperm(n, generator=gen).to(device)
        for s in range(0, n, batch):
            idx = order[s : s + batch]
            # Low-resolution codes: many exact distance ties, resolved by row index.
            codes = torch.randint(-2, 3, (idx.numel(), d), generator=gen).float().to(device)
            got = a.neighbours(idx, codes)
            want = reference_neighbours(b, idx, codes)
            assert torch.equal(got.rows, want.rows)
            assert torch.equal(got.codes, want.codes)
            assert_same_state(snapshot(a), snapshot(b))
        # One pick per example; only a fallback pick repeats a used row.
        assert int(a.used.sum()) == n - (a.fallbacks - start)
        a.new_pass()
        b.new_pass()
    assert a.pass_index == 2
    if headroom == 0:
        assert calls.count(1) > 10  # the repeated single-query searches were exercised
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
    bank.update(torch.tensor([5]), torch.tensor([[0.0, float("inf"), 1.0]]))
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
