"""The tests' and benchmarks' shared helpers, in one place (docs/design.md, "Layout").

- The backend x device x dtype matrix, taken from the capability table
  (:data:`acn_kernels.dispatch.CAPABILITIES`): :func:`params`. A combination this process cannot
  run is a skipped parameter with its reasons (from :func:`acn_kernels.dispatch.not_supported_reasons`),
  never left out; Triton parameters carry the ``triton`` marker (they run in the pytest process
  started with TRITON_INTERPRET=1), GPU parameters the ``cuda`` marker.
- Input factories for both ops: :func:`grid_data`, :func:`normal`, :func:`topk_inputs`,
  :func:`mixture_inputs` (also used by tests/benchmarks and tests/sanitize_driver.py).
- The poison hook (:func:`poisoned_outputs`) and the float64 oracles' wrappers.
- Tolerances relative to the result itself: :data:`RTOL`, :func:`assert_close`; the result
  checks of masked_topk (:func:`check_topk`, :func:`assert_topk_exact`, :func:`assert_topk_close`)
  and of the mixture ops (:func:`check_mixture`); :data:`KNOWN_BUGS`.
- The check behind ACN_REQUIRE_BACKENDS (tests/conftest.py): :func:`required_backend_problems`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import pytest
import torch

import acn_kernels
from acn_kernels import _ext, _testing, dispatch, reference

HAS_GPU = torch.cuda.is_available()
INTERPRET = dispatch.triton_interpreting()
COMPILED = ("cpu", "cuda", "triton")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
"""Every input dtype of the ops, in the order the parameters list them."""

requires_ext = pytest.mark.skipif(_ext.C is None, reason=f"_C did not load: {_ext.LOAD_ERROR}")


# ---------------------------------------------------------------------------------------------
# The backend x dtype matrix


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32."""
    return str(dtype).removeprefix("torch.")


def skip_reasons(backend: str, op: str, device: str, dtype: torch.dtype) -> list[str]:
    """Why ``backend`` cannot run ``op`` on ``device`` / ``dtype`` tensors in this process:
    the dispatcher's reasons, plus a missing GPU (which the table cannot know)."""
    reasons = dispatch.not_supported_reasons(backend, op, torch.device(device), dtype)
    if device == "cuda" and not HAS_GPU:
        reasons.append("no CUDA device is visible")
    return reasons


KNOWN_BUGS: dict[str, str] = {}
"""Contract violations that a test exposes and that are not fixed yet (none at present). One
strict test per entry (``params(xfail=...)``) fails once the bug is fixed; other tests whose data
may show it wrap their checks in :func:`known_bug`."""


@contextlib.contextmanager
def known_bug(backend: str, bugs: Mapping[str, str]) -> Iterator[None]:
    """An AssertionError inside is an expected failure (XFAIL, with the bug and the error) for a
    backend that ``bugs`` maps to a :data:`KNOWN_BUGS` key; other backends fail as usual."""
    try:
        yield
    except AssertionError as e:
        if backend in bugs:
            pytest.xfail(f"{KNOWN_BUGS[bugs[backend]]}: {str(e).splitlines()[0][:200]}")
        raise


def params(
    op: str,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    backends: Iterable[str] = dispatch.BACKENDS,
    devices: Iterable[str] | None = None,
    xfail: Mapping[str, str] | None = None,
) -> list:
    """pytest parameters ``backend, device, dtype`` for ``op``: every backend of the capability
    table, every device type it runs and every dtype it takes, optionally restricted to
    ``dtypes`` / ``backends`` / ``devices``. Ids read ``backend-device-dtype``. ``xfail`` maps a
    backend to a :data:`KNOWN_BUGS` key: its parameters must fail an assertion (strict xfail)."""
    wanted = set(DTYPES if dtypes is None else dtypes)
    out = []
    for be in backends:
        cap = dispatch.CAPABILITIES[be]
        for dev in sorted(cap.devices):
            if devices is not None and dev not in devices:
                continue
            for dt in DTYPES:
                if dt not in cap.dtypes or dt not in wanted:
                    continue
                marks = [pytest.mark.triton] if be == "triton" else []
                if dev == "cuda":
                    marks.append(pytest.mark.cuda)
                if xfail and be in xfail:
                    marks.append(pytest.mark.xfail(reason=KNOWN_BUGS[xfail[be]], raises=AssertionError,
                                                   strict=True))
                reasons = skip_reasons(be, op, dev, dt)
                if reasons:
                    marks.append(pytest.mark.skip(reason=f"{be} on {dev}: {'; '.join(reasons)}"))
                out.append(pytest.param(be, dev, dt, id=f"{be}-{dev}-{dtype_name(dt)}", marks=marks))
    return out


def backend_params(include_torch: bool = False, op: str = "masked_topk") -> list:
    """pytest parameters ``backend, device`` for tests whose subject does not depend on the
    dtype (e.g. the modules over the ops): :func:`params` at float32, ids ``backend-device``;
    the compiled backends, and "torch" if asked."""
    backends = [b for b in dispatch.BACKENDS if include_torch or b != "torch"]
    return [pytest.param(*p.values[:2], id=p.id.removesuffix("-float32"), marks=p.marks)
            for p in params(op, dtypes=[torch.float32], backends=backends)]


def unsupported_params() -> list:
    """pytest parameters ``backend, dtype``: every dtype a backend does not take (per the table)."""
    return [pytest.param(be, dt, id=f"{be}-{dtype_name(dt)}") for be, cap in dispatch.CAPABILITIES.items()
            for dt in DTYPES if dt not in cap.dtypes]


def interpreted(backend: str, device: str) -> bool:
    """Triton on CPU tensors: the interpreter, about a millisecond of Python per program."""
    return backend == "triton" and device == "cpu"


def sized(backend: str, device: str, full, small):
    """``full``, or ``small`` under the Triton interpreter (shapes must stay small there)."""
    return small if interpreted(backend, device) else full


def skip_if_interpreted(backend: str, device: str, why: str = "too large for the Triton interpreter") -> None:
    """Skip the test under the Triton interpreter, saying why."""
    if interpreted(backend, device):
        pytest.skip(f"{why} (a GPU runs it)")


def required_backend_problems(
    required: Iterable[str], available: Mapping[str, bool], passed: Mapping[str, int]
) -> list[str]:
    """What is wrong with the required backends (ACN_REQUIRE_BACKENDS): unknown names,
    backends that cannot run in this process, backends none of whose tests passed."""
    problems = []
    for name in required:
        if name not in dispatch.BACKENDS:
            problems.append(f"{name!r} is not a backend (one of {', '.join(dispatch.BACKENDS)})")
        elif not available.get(name, False):
            why = dispatch.build_reason(name) or "it cannot run in this process"
            problems.append(f"backend {name!r} is required but unavailable: {why}")
        elif not passed.get(name, 0):
            problems.append(f"backend {name!r} is required but none of its parametrised tests passed")
    return problems


# ---------------------------------------------------------------------------------------------
# Input factories


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (every factory draws on the CPU)."""
    return torch.Generator().manual_seed(seed)


def grid_data(n: int, d: int, *, seed: int, levels: int = 9, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """[n, d] half-integers in [-2, 2]: every squared distance is exact in every dtype (and in
    the direct and expanded forms alike), so masked_topk must match the reference bit for bit,
    ties included (and there are many ties)."""
    x = (torch.randint(0, levels, (n, d), generator=generator(seed)) - levels // 2).double() / 2
    return x.to(dtype=dtype, device=device)


def normal(*shape: int, seed: int | torch.Generator, loc: float = 0.0, scale: float = 1.0,
           dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """N(loc, scale^2) drawn in float64 on the CPU (the same values on every device), then
    rounded to ``dtype``. ``seed`` may be a generator to draw several tensors from one stream."""
    g = generator(seed) if isinstance(seed, int) else seed
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc
    return x.to(dtype=dtype, device=device)


def topk_inputs(
    b: int, n: int, d: int, *, seed: int, masked: float = 0.0, excluded: bool = False,
    loc: float = 0.0, scale: float = 1.0, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(queries [b, d], bank [n, d], exclude_mask [n] or None, exclude_index [b] or None) with
    normal values, queries N(loc, scale^2) and bank N(0, scale^2) (``loc`` takes the queries off
    the bank's centre and the origin); a fraction ``masked`` of the rows masked at random;
    exclusions uniform in [-1, n)."""
    g = generator(seed)
    q = normal(b, d, seed=g, loc=loc, scale=scale, dtype=dtype, device=device)
    bank = normal(n, d, seed=g, scale=scale, dtype=dtype, device=device)
    mask = (torch.rand(n, generator=g) < masked).to(device) if masked else None
    excl = torch.randint(-1, n, (b,), generator=g).to(device) if excluded else None
    return q, bank, mask, excl


def mixture_inputs(
    b: int, d: int, m: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu", log_scales: tuple[float, float] = (-2.0, 1.0),
    logit_scale: float = 2.0, loc: float = 0.0,
) -> list[torch.Tensor]:
    """[z [b, d], logits, means, log_scales [b, d, m], code [b, d]], drawn in float64 and
    rounded to ``dtype``: z, means, code N(loc, 4) / N(loc, 1), logits N(0, logit_scale^2),
    log-scales uniform in ``log_scales``."""
    g = generator(seed)
    z = normal(b, d, seed=g, loc=loc, scale=2.0, dtype=torch.float64)
    logits = normal(b, d, m, seed=g, scale=logit_scale, dtype=torch.float64)
    means = normal(b, d, m, seed=g, loc=loc, scale=2.0, dtype=torch.float64)
    ls = torch.empty(b, d, m, dtype=torch.float64).uniform_(*log_scales, generator=g)
    code = normal(b, d, seed=g, loc=loc, dtype=torch.float64)
    return [t.to(dtype=dtype, device=device) for t in (z, logits, means, ls, code)]


# ---------------------------------------------------------------------------------------------
# Poison hook and oracles


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Kernels allocate outputs filled with NaN / INT64_MIN, so an unwritten element fails a test."""
    prev = _testing.POISON
    _testing.set_poison(True)
    try:
        yield
    finally:
        _testing.set_poison(prev)


def f64(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Detached float64 CPU copies (the oracles' inputs: the same rounded values)."""
    return [t.detach().cpu().double() for t in tensors]


def ref_topk(q, bank, k, mask=None, excl=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference masked_topk of the same (rounded) inputs, on the CPU."""
    return reference.masked_topk(*f64((q, bank)), k, None if mask is None else mask.cpu(),
                                 None if excl is None else excl.cpu())


def value_and_grads(fn: Callable, inputs: Sequence[torch.Tensor], seed: int = 1):
    """(fn(*inputs), the gradients of <fn(*inputs), g> for a random g), the inputs as fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=generator(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, g.to(dtype=out.dtype, device=out.device))
    return out.detach(), grads


# ---------------------------------------------------------------------------------------------
# Tolerances relative to the result


RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
"""Relative error allowed in a value stored in each dtype: a few roundings of float32 or
float64 arithmetic, one rounding (2^-11, 2^-8) for half-precision gradients."""


def row_scale(t: torch.Tensor) -> torch.Tensor:
    """The magnitude of each row (first index) of a result: max |finite element|, broadcastable."""
    a = torch.where(torch.isfinite(t), t.abs(), torch.zeros_like(t))
    if t.dim() < 2 or t.numel() == 0:
        return a
    return a.flatten(1).amax(1).reshape(-1, *([1] * (t.dim() - 1)))


def assert_close(got: torch.Tensor, want: torch.Tensor, *, rtol: float, scale: torch.Tensor | None = None,
                 msg: str = "") -> None:
    """|got - want| <= rtol * scale element by element, with scale the result's own magnitude
    (default: :func:`row_scale` of ``want``: each example's result relative to itself, never to
    the inputs' norms). Non-finite elements must agree exactly (NaN with NaN, inf with inf)."""
    got = got.detach().cpu().double()
    want = want.detach().cpu().double()
    assert got.shape == want.shape, f"{msg} shape {tuple(got.shape)} != {tuple(want.shape)}"
    fin = torch.isfinite(want)
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    assert same[~fin].all(), f"{msg} non-finite elements differ: got {got[~fin & ~same][:5].tolist()}"
    s = (row_scale(want) if scale is None else scale.detach().cpu().double()).expand_as(want)
    err = (got - want).abs()
    bad = fin & ~(err <= rtol * s)
    if bad.any():
        worst = (err / s.clamp_min(math.ulp(0.0))).masked_fill(~fin, 0).max().item()
        raise AssertionError(f"{msg} {int(bad.sum())} of {want.numel()} elements off; worst relative "
                             f"error {worst:.3g} > rtol {rtol:g}; first {got[bad][:3].tolist()} vs "
                             f"{want[bad][:3].tolist()}")


def topk_rtol(dtype: torch.dtype, d: int) -> float:
    """Relative error of a direct-form distance, a sum of d positive squares accumulated in
    float32 (float64 for float64 input): at most about (d + 2) roundings."""
    acc = reference.acc_dtype(dtype)
    return 2.0 * (d + 2) * torch.finfo(acc).eps



# ---------------------------------------------------------------------------------------------
# masked_topk results


def run_topk(backend: str, q, bank, k, mask=None, excl=None) -> tuple[torch.Tensor, torch.Tensor]:
    """masked_topk with outputs poisoned (an unwritten element cannot pass); results on the CPU."""
    with poisoned_outputs():
        d, i = acn_kernels.masked_topk(q, bank, k, exclude_mask=mask, exclude_index=excl, backend=backend)
    return d.cpu(), i.cpu()


def exact_dists(q: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """The contract's distance of each selected pair, recomputed in float64 from the same inputs:
    overflow past the ``acc`` dtype's range reports its largest finite value; +inf at padding."""
    q64, b64 = f64((q, bank))
    d = (q64.unsqueeze(1) - b64[idx.clamp_min(0)]).square().sum(-1)
    big = torch.finfo(acc).max
    d = torch.where(torch.isinf(d), big, d).clamp_max(big)
    return torch.where(idx >= 0, d, math.inf)


def check_topk(d, i, q, bank, k, mask=None, excl=None) -> None:
    """The contract's structure of a result: shapes and dtypes; padding (+inf, -1) at the tail
    only; eligibility (mask, exclusion, finite query and row); distinct rows; ascending order;
    each reported distance the pair's squared distance within :func:`topk_rtol` of itself."""
    acc = reference.acc_dtype(q.dtype)
    b = q.shape[0]
    assert d.shape == (b, k) and i.shape == (b, k), (d.shape, i.shape)
    assert d.dtype == acc and i.dtype == torch.int64, (d.dtype, i.dtype)
    pad = i < 0
    assert (i[pad] == -1).all(), "padding index must be -1"
    assert (d[pad] == math.inf).all(), "padding dist must be +inf"
    assert (d[~pad] >= 0).all() and torch.isfinite(d[~pad]).all()
    assert (pad[:, 1:] | ~pad[:, :-1]).all(), "padding only at the tail"
    assert (d[:, 1:] >= d[:, :-1]).all(), "dists must be ascending"
    assert (i < bank.shape[0]).all()
    rows = i.clamp_min(0)
    q64, b64 = f64((q, bank))
    assert not (~pad & ~torch.isfinite(q64).all(1, keepdim=True)).any(), "a non-finite query was paired"
    assert not (~pad & ~torch.isfinite(b64).all(1)[rows]).any(), "a non-finite row was returned"
    if mask is not None:
        assert not (~pad & mask.cpu()[rows]).any(), "a masked row was returned"
    if excl is not None:
        assert not (~pad & (i == excl.cpu().unsqueeze(1))).any(), "the excluded row was returned"
    for r in range(b):
        got = i[r][~pad[r]]
        assert got.unique().numel() == got.numel(), "duplicate rows in one result"
    true = exact_dists(q, bank, i, acc)
    assert_close(d, true, rtol=topk_rtol(q.dtype, q.shape[1]), scale=true, msg="reported dists")


def assert_topk_exact(got, want) -> None:
    (d, i), (rd, ri) = got, want
    assert torch.equal(i, ri), "rows differ"
    assert torch.equal(d.double(), rd.double()), "dists differ"


def assert_topk_close(got, want, q, bank, rtol: float) -> None:
    """Two selections of the same problem agree up to rounding: the same padding; the true
    distances of their rows (float64, recomputed) equal within ``rtol`` of themselves, position
    by position; the same rows wherever the true distance is clear of its neighbours (no near-tie
    that rounding may order otherwise). ``want`` may come from any oracle (its own distances are
    not used)."""
    (_, i), (_, ri) = got, want
    assert torch.equal(i < 0, ri < 0), "padding differs"
    acc = torch.float64
    td, tr = exact_dists(q, bank, i, acc), exact_dists(q, bank, ri, acc)
    assert_close(td, tr, rtol=rtol, scale=tr, msg="true dists of the selected rows")
    r = tr.nan_to_num(posinf=1e300)
    gap_lo = torch.cat([torch.full_like(r[:, :1], math.inf), r.diff(dim=1)], 1)
    gap_hi = torch.cat([r.diff(dim=1), torch.full_like(r[:, :1], math.inf)], 1)
    clear = (ri >= 0) & (gap_lo > 2 * rtol * r) & (gap_hi > 2 * rtol * r)
    assert torch.equal(i[clear], ri[clear]), "rows differ where there is no tie"


# ---------------------------------------------------------------------------------------------
# mixture results


MIXTURE_KINDS = ["log_prob", "log_prob_per_dim", "acn_kl", "acn_kl_scale"]
"""mixture_log_prob [B], mixture_log_prob(per_dim=True) [B, D], acn_kl [B] with the unit
posterior and with a posterior log-scale (:func:`posterior_log_scale`) [B]."""


def posterior_log_scale(code: torch.Tensor) -> torch.Tensor:
    """The posterior log-scale of the "acn_kl_scale" kind, [B, D] in [-2, 2] (scales 0.14 to 7.4),
    code's dtype, device and strides: a fixed function of code, so that every input set (and
    every change a test makes to one) carries its own."""
    return 2.0 * torch.sin(3.0 * code)


def op_inputs(kind: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The arguments of ``kind`` from mixture_inputs' [z, logits, means, log_scales, code]."""
    z, lg, mu, ls, code = inputs
    if kind == "acn_kl_scale":
        return [z, code, lg, mu, ls, posterior_log_scale(code)]
    return [z, code, lg, mu, ls] if kind == "acn_kl" else [z, lg, mu, ls]


def mixture_op(kind: str, backend: str) -> Callable[..., torch.Tensor]:
    """The public function of ``kind`` on ``backend``, taking :func:`op_inputs`' arguments."""
    if kind == "acn_kl_scale":
        return lambda *t: acn_kernels.acn_kl(*t[:5], posterior_log_scale=t[5], backend=backend)
    if kind == "acn_kl":
        return lambda *t: acn_kernels.acn_kl(*t, backend=backend)
    return lambda *t: acn_kernels.mixture_log_prob(*t, per_dim=kind == "log_prob_per_dim", backend=backend)


def mixture_result_scale(kind: str, args64: list[torch.Tensor]) -> torch.Tensor | None:
    """The magnitude a result is compared against: a row sum over D relative to the sum of
    its per-dimension terms' magnitudes (a sum can cancel; its rounding cannot); per-dimension
    values relative to their row (:func:`row_scale`, the default)."""
    if kind == "log_prob_per_dim":
        return None
    z, *rest = args64
    if kind in ("acn_kl", "acn_kl_scale"):
        code, lg, mu, ls = rest[:4]
        pls = rest[4] if kind == "acn_kl_scale" else torch.zeros_like(z)
        v = (z - code) * torch.exp(-pls)
        terms = 0.5 * v * v + reference.HALF_LOG_2PI + pls.abs() + \
            reference.mixture_log_prob(z, lg, mu, ls, per_dim=True).abs()
    else:
        terms = reference.mixture_log_prob(z, *rest, per_dim=True).abs()
    return terms.nan_to_num(0.0, 0.0, 0.0).sum(-1)


def mixture_grad_scale(grads: list[torch.Tensor]) -> torch.Tensor:
    """The magnitude the gradients of element (b, d) are compared against: the largest of all of
    its gradients ([B, D, 1]; a gradient such as dlogits = g (r - pi) can cancel to far below the
    terms it is made of, the others of the same element cannot all)."""
    per_elem = [torch.where(torch.isfinite(g), g.abs(), 0.0) for g in f64(grads)]
    per_elem = [g.amax(-1) if g.dim() == 3 else g for g in per_elem]
    return torch.stack(per_elem).amax(0).unsqueeze(-1)


def check_mixture(kind: str, backend: str, inputs: list[torch.Tensor]):
    """Forward and every gradient of ``kind`` on ``backend`` (outputs poisoned) against the
    float64 reference on the same rounded inputs: result dtype float32 (float64 for float64),
    gradients in the input dtype (so the reference's are rounded to it: inf beyond its range),
    all within the result-relative tolerance. Returns ((out, grads), (ref, ref_grads))."""
    args = op_inputs(kind, inputs)
    dtype = args[0].dtype
    with poisoned_outputs():
        out, grads = value_and_grads(mixture_op(kind, backend), args)
    args64 = f64(args)
    ref, ref_grads = value_and_grads(mixture_op(kind, "torch"), args64)
    acc = reference.acc_dtype(dtype)
    assert out.dtype == acc and out.shape == ref.shape, (out.dtype, out.shape)
    assert_close(out, ref, rtol=RTOL[acc], scale=mixture_result_scale(kind, args64), msg=f"{kind} value")
    names = {"acn_kl": ("dz", "dcode", "dlogits", "dmeans", "dlog_scales"),
             "acn_kl_scale": ("dz", "dcode", "dlogits", "dmeans", "dlog_scales", "dposterior_log_scale")}.get(
                 kind, ("dz", "dlogits", "dmeans", "dlog_scales"))
    s = mixture_grad_scale(ref_grads)
    for name, g, want in zip(names, grads, ref_grads, strict=True):
        assert g.dtype == dtype and g.shape == want.shape, (name, g.dtype)
        scale = s if want.dim() == 3 else s.squeeze(-1)
        assert_close(g, want.to(dtype), rtol=2 * RTOL[dtype], scale=scale, msg=f"{kind} {name}")
    return (out, grads), (ref, ref_grads)
