"""resolve_neighbours on every runnable backend: the reference on hand-made walks, every backend
against the reference (random walks with many conflicts, padding anywhere, own rows in the lists,
edge uniforms, large row numbers, batches past the CUDA kernel's shared-memory set), poisoned
outputs, dtypes and layouts, registration (opcheck, torch.compile), dispatch and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from testing import backend_params, poisoned_outputs, requires_ext

import acn_kernels
from acn_kernels import _ext, reference
from acn_kernels.checks import FALLBACK, NEEDS_SEARCH, RESOLVED
from acn_kernels.ops import resolve_neighbours

# There is no Triton kernel of the walk (docs/design.md, "resolve_neighbours").
BACKENDS = [p for p in backend_params(include_torch=True) if p.values[0] != "triton"]
COMPILED = [p for p in backend_params() if p.values[0] != "triton"]
ONE_LESS_THAN_ONE = math.nextafter(1.0, 0.0)


def run(backend, device, cand, index, u, k, fallback=None):
    """resolve_neighbours with outputs poisoned (an unwritten element cannot pass), on the host."""
    args = [t.to(device) for t in (cand, index, u)]
    with poisoned_outputs():
        out = resolve_neighbours(*args, k, fallback=None if fallback is None else fallback.to(device),
                                 backend=backend)
    for t in out:
        assert t.dtype == torch.int64 and t.shape == index.shape and t.device.type == device
    return tuple(t.cpu() for t in out)


def expect(backend, device, cand, index, u, k, fallback=None):
    got = run(backend, device, cand, index, u, k, fallback)
    want = reference.resolve_neighbours(cand, index, u, k, fallback)
    for name, g, w in zip(("picks", "taken", "status"), got, want, strict=True):
        assert torch.equal(g, w), f"{name}: got {g.tolist()}, want {w.tolist()}"
    return got


def t64(rows):
    return torch.tensor(rows, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# The reference on walks worked out by hand (the oracle itself must be right)


def test_reference_conflicts_and_picks():
    # k = 2. Query 0 (own row 0) keeps [5, 6], picks slot floor(0.6 * 2) = 1: row 6. Query 1
    # (own row 7) loses 6 (taken) and 7 (its own), keeps [8, 9]: slot floor(0.1 * 2) = 0, row 8.
    u = torch.tensor([0.6, 0.1, 0.99])
    index = t64([0, 7, 3])
    # Query 2 keeps only [5] of [6, 8, 5, -1]; the list has padding, so 5 is all there is: row 5.
    out = reference.resolve_neighbours(t64([[5, 6, 1, 9], [6, 7, 8, 9], [6, 8, 5, -1]]), index, u, 2)
    assert [x.tolist() for x in out] == [[6, 8, 5], [6, 8, 5], [RESOLVED] * 3]
    # Query 2 keeps only [5] of the full list [6, 8, -1, 5]: rows beyond it may be eligible.
    out = reference.resolve_neighbours(t64([[5, 6, 1, 9], [6, 7, 8, 9], [6, 8, -1, 5]]), index, u, 2)
    assert [x.tolist() for x in out] == [[6, 8, -1], [6, 8, -1], [RESOLVED, RESOLVED, NEEDS_SEARCH]]


def test_reference_search_stops_the_walk_and_fallback_takes_nothing():
    cand = t64([[1, 2], [1, 2], [3, -1], [1, -1]])
    fb = t64([[9, 8], [9, 8], [9, 8], [3, 4]])
    u = torch.tensor([0.0, 0.0, 0.0, 0.99], dtype=torch.float64)
    # k = 1: query 0 takes 1; query 1 keeps [2]; query 2 keeps [3]; query 3 loses 1, its list
    # had padding: FALLBACK, picks fallback slot floor(0.99 * 2) = 1 (row 4), takes nothing.
    assert [x.tolist() for x in reference.resolve_neighbours(cand, t64([0, 5, 6, 7]), u, 1, fb)] == [
        [1, 2, 3, 4], [1, 2, 3, -1], [RESOLVED, RESOLVED, RESOLVED, FALLBACK]]
    # k = 2: query 0 keeps [1, 2] (slot 0: row 1); query 1's full list keeps only [2] < k:
    # NEEDS_SEARCH, and so does every later query, whatever its own list.
    assert [x.tolist() for x in reference.resolve_neighbours(cand, t64([0, 5, 6, 7]), u, 2, fb)] == [
        [1, -1, -1, -1], [1, -1, -1, -1], [RESOLVED, NEEDS_SEARCH, NEEDS_SEARCH, NEEDS_SEARCH]]
    # Without fallback lists a FALLBACK query picks nothing; the own row is never a fallback pick.
    out = reference.resolve_neighbours(t64([[-1]]), t64([3]), torch.tensor([0.0]), 1, t64([[3, -1]]))
    assert [x.tolist() for x in out] == [[-1], [-1], [FALLBACK]]


def test_pick_slot_edges():
    assert reference.pick_slot(0.0, 5) == 0
    assert reference.pick_slot(ONE_LESS_THAN_ONE, 5) == 4
    assert reference.pick_slot(0.4, 5) == 2
    assert reference.pick_slot(1.0, 5) == 4 and reference.pick_slot(7.0, 5) == 4
    assert reference.pick_slot(-0.5, 5) == 0 and reference.pick_slot(math.nan, 5) == 0
    assert reference.pick_slot(0.99, 1) == 0


# ---------------------------------------------------------------------------------------------
# Every backend against the reference


@st.composite
def walk_case(draw):
    b = draw(st.integers(0, 40))
    c = draw(st.integers(0, 12))
    k = draw(st.integers(1, 8))
    rows = draw(st.integers(1, 30))  # a small row range: many conflicts between queries
    offset = draw(st.sampled_from([0, 1 << 40]))  # row numbers beyond 32 bits
    seed = draw(st.integers(0, 2**31 - 1))
    messy = draw(st.booleans())  # padding anywhere, negative values other than -1, duplicates
    f = draw(st.one_of(st.none(), st.integers(0, 6)))
    u_dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    edge_u = draw(st.booleans())
    return b, c, k, rows, offset, seed, messy, f, u_dtype, edge_u


def make_walk(b, c, k, rows, offset, seed, messy, f, u_dtype, edge_u):
    """Candidate lists shaped like masked_topk's (distinct rows, then -1 padding) or messier."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, rows, (b,), generator=g) + offset
    cand = torch.full((b, c), -1, dtype=torch.int64)
    for q in range(b):
        n = int(torch.randint(0, min(c, rows) + 1, (1,), generator=g))
        cand[q, :n] = torch.randperm(rows, generator=g)[:n] + offset
    if messy and b and c:
        cand = torch.where(torch.rand(b, c, generator=g) < 0.2,
                           torch.randint(-3, 0, (b, c), generator=g), cand)
        cand = torch.where(torch.rand(b, c, generator=g) < 0.2,
                           torch.randint(0, rows, (b, c), generator=g) + offset, cand)
    u = torch.rand(b, generator=g, dtype=torch.float64).to(u_dtype)
    if edge_u and b:
        edges = torch.tensor([0.0, ONE_LESS_THAN_ONE, 1.0, -0.5, 1.5, math.nan], dtype=u_dtype)
        u = torch.where(torch.rand(b, generator=g) < 0.5, edges[torch.randint(0, 6, (b,), generator=g)], u)
    fallback = None
    if f is not None:
        fallback = torch.randint(-1, rows, (b, f), generator=g)
        fallback = torch.where(fallback >= 0, fallback + offset, fallback)
    return cand, index, u, k, fallback


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(case=walk_case())
def test_property_vs_reference(backend, device, case):
    expect(backend, device, *make_walk(*case))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("b,c,k", [(1, 1, 1), (7, 33, 5), (100, 70, 40), (300, 10, 5), (2049, 12, 5), (4096, 9, 5)])
def test_shapes_vs_reference(backend, device, b, c, k):
    """Lists longer than a warp, k above and below C, and batches past 2048 queries (where the
    CUDA kernel's taken set moves from shared memory to its global workspace)."""
    for seed, with_fb in ((b, False), (b + 1, True)):
        expect(backend, device, *make_walk(b, c, k, max(4, b // 2), 0, seed, False, 6 if with_fb else None,
                                           torch.float64, False))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_candidates_from_masked_topk(backend, device):
    """Lists as the bank makes them: masked_topk with headroom over a bank with used rows, then the
    walk; at every headroom some queries resolve and (with little headroom) some search again."""
    g = torch.Generator().manual_seed(5)
    bank = torch.randint(-2, 3, (60, 3), generator=g).float()
    index = torch.randperm(60, generator=g)[:24]
    used = torch.rand(60, generator=g) < 0.5
    used[index] = False
    u = torch.rand(24, generator=g, dtype=torch.float64)
    seen = set()
    for width in (5, 7, 28):
        cand = acn_kernels.masked_topk(bank[index], bank, width, exclude_mask=used, exclude_index=index).indices
        got = expect(backend, device, cand, index, u, 5)
        seen.update(got[2].tolist())
    assert RESOLVED in seen and NEEDS_SEARCH in seen


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    cand, index, u, k, fb = make_walk(30, 8, 3, 12, 0, 9, False, 4, torch.float64, False)
    wide = torch.stack([cand, cand], 2)[:, :, 0]  # stride 2 in the last dimension
    assert not wide.is_contiguous()
    idx2 = torch.stack([index, index], 1)[:, 1]
    u2 = torch.stack([u, u], 1)[:, 0]
    fb2 = fb.t().contiguous().t()
    assert not (idx2.is_contiguous() or u2.is_contiguous() or fb2.is_contiguous())
    got = run(backend, device, wide, idx2, u2, k, fb2)
    want = reference.resolve_neighbours(cand, index, u, k, fb)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty(backend, device):
    for b, c in ((0, 0), (0, 5), (3, 0)):
        got = expect(backend, device, torch.full((b, c), -1, dtype=torch.int64), torch.arange(b),
                     torch.zeros(b, dtype=torch.float64), 2)
        assert got[2].tolist() == [FALLBACK] * b


# ---------------------------------------------------------------------------------------------
# Registration, compile, dispatch


@requires_ext
def test_opcheck():
    cand, index, u, k, fb = make_walk(20, 9, 4, 10, 0, 3, True, 5, torch.float64, True)
    devices = ["cpu"] + (["cuda"] if acn_kernels.backends()["cuda"] else [])
    for dev in devices:
        for f in (fb, None):
            args = (cand.to(dev), index.to(dev), u.to(dev), k, None if f is None else f.to(dev))
            torch.library.opcheck(torch.ops.acn_kernels.resolve_neighbours, args)


@requires_ext
def test_kernels_registered():
    keys = ["CPU"] + (["CUDA"] if _ext.C.built_with_cuda() else [])
    for key in keys:
        assert torch._C._dispatch_has_kernel_for_dispatch_key("acn_kernels::resolve_neighbours", key), key


@requires_ext
def test_status_codes_match_the_extension():
    assert tuple(_ext.C.RESOLVE_STATUS) == (RESOLVED, NEEDS_SEARCH, FALLBACK)


@pytest.mark.parametrize("backend,device", COMPILED)
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile(backend, device, dynamic):
    torch._dynamo.reset()

    def f(cand, index, u, fb):
        out = resolve_neighbours(cand, index, u, 3, fallback=fb, backend=backend)
        return out.picks + 1, out.taken, out.status

    cf = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for b in (9, 17):
        cand, index, u, _, fb = make_walk(b, 6, 3, 8, 0, b, False, 3, torch.float64, False)
        args = [t.to(device) for t in (cand, index, u, fb)]
        for got, want in zip(cf(*args), f(*args), strict=True):
            assert torch.equal(got, want)


def test_no_triton_kernel(monkeypatch):
    cand, index, u, k, _ = make_walk(4, 3, 2, 5, 0, 0, False, None, torch.float64, False)
    with pytest.raises(RuntimeError, match="it has no resolve_neighbours kernel"):
        resolve_neighbours(cand, index, u, k, backend="triton")
    # The environment variable is a preference for every op: this one then dispatches automatically.
    monkeypatch.setenv("ACN_KERNELS_BACKEND", "triton")
    got = resolve_neighbours(cand, index, u, k)
    assert all(torch.equal(a, b) for a, b in zip(got, reference.resolve_neighbours(cand, index, u, k), strict=True))


# ---------------------------------------------------------------------------------------------
# Bad input


def _good():
    return dict(candidates=torch.tensor([[1, 2], [0, -1]]), index=torch.tensor([0, 1]),
                uniforms=torch.tensor([0.5, 0.5], dtype=torch.float64), k=1,
                fallback=torch.tensor([[1], [0]]))


BAD = [
    ("cand dtype", lambda a: a.update(candidates=torch.zeros(2, 2, dtype=torch.int32)), TypeError,
     "candidates must be an int64 tensor"),
    ("cand rank", lambda a: a.update(candidates=torch.zeros(2, dtype=torch.int64)), ValueError,
     r"candidates must have shape \[B, C\]"),
    ("index dtype", lambda a: a.update(index=torch.zeros(2)), TypeError, "index must be an int64 tensor"),
    ("index rank", lambda a: a.update(index=torch.zeros(2, 1, dtype=torch.int64)), ValueError,
     r"index must have shape \[B\]"),
    ("index len", lambda a: a.update(index=torch.zeros(3, dtype=torch.int64)), ValueError,
     r"index must have shape \[B\] = \[2\]"),
    ("u dtype", lambda a: a.update(uniforms=torch.zeros(2, dtype=torch.float16)), TypeError,
     "uniforms must be (a )?float32 or float64"),
    ("u len", lambda a: a.update(uniforms=torch.zeros(3)), ValueError, r"uniforms must have shape \[B\] = \[2\]"),
    ("k<1", lambda a: a.update(k=0), ValueError, "k must be >= 1"),
    ("k>MAX_K", lambda a: a.update(k=acn_kernels.MAX_K + 1), ValueError, "MAX_K"),
    ("fb dtype", lambda a: a.update(fallback=torch.zeros(2, 1)), TypeError, "fallback must be an int64 tensor"),
    ("fb rows", lambda a: a.update(fallback=torch.zeros(3, 1, dtype=torch.int64)), ValueError,
     r"fallback must have shape \[B, F\] with B = 2"),
    ("k type", lambda a: a.update(k=1.0), TypeError, "k must be an int"),
    ("index device", lambda a: a.update(index=torch.zeros(2, dtype=torch.int64, device="meta")), ValueError,
     "index is on meta"),
    ("u device", lambda a: a.update(uniforms=torch.zeros(2, device="meta")), ValueError, "uniforms is on meta"),
    ("fb device", lambda a: a.update(fallback=torch.zeros(2, 1, dtype=torch.int64, device="meta")), ValueError,
     "fallback is on meta"),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name,change,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, device, name, change, exc, match):
    args = _good()
    change(args)
    args = {key: (v.to(device) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v)
            for key, v in args.items()}
    fb = args.pop("fallback")
    with pytest.raises(exc, match=match):
        resolve_neighbours(*args.values(), fallback=fb, backend=backend)


# The schema itself types k; a meta tensor sends the call to the fake kernel.
CPP_BAD = [b for b in BAD if b[0] != "k type" and not b[0].endswith("device")]


@requires_ext
@pytest.mark.parametrize("name,change,exc,match", CPP_BAD, ids=[b[0] for b in CPP_BAD])
def test_bad_input_cpp_op(name, change, exc, match):
    """The registered op checks the same things itself (RuntimeError), naming the argument."""
    args = _good()
    change(args)
    with pytest.raises(RuntimeError, match=match.replace("an int64 tensor", "int64").replace("(a )?", "")):
        torch.ops.acn_kernels.resolve_neighbours(*args.values())
