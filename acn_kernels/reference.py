"""Plain-PyTorch implementations of the ops: the "torch" backend and the oracle of the tests.

Differentiable through autograd, float64-capable, and written for clarity over speed. Both follow
the contracts of docs/design.md exactly (masks, ties, padding, -inf rows), so every kernel is compared
against them.
"""

from __future__ import annotations

import math

import torch

from .checks import FALLBACK, NEEDS_SEARCH, RESOLVED

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32 (the accumulation and result dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mixture_log_prob_per_dim(
    z: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log p(z_d) per dimension, [B, D], in the accumulation dtype.

    z [B, D]; logits, means, log_scales [B, D, M]. Matches the kernels' contract where plain
    autograd would produce NaN: a component whose density underflows to zero gets exactly zero
    mean and scale gradients, and a dimension whose every term is -inf gives -inf with zero
    gradients. NaN inputs give NaN.
    """
    dt = acc_dtype(z.dtype)
    z, logits, means, log_scales = (t.to(dt) for t in (z, logits, means, log_scales))
    zm = z.unsqueeze(-1)
    with torch.no_grad():
        u0 = (zm - means) * torch.exp(-log_scales)
        underflow = torch.isneginf(-0.5 * u0 * u0 - log_scales)
    # Where the density is exactly zero, evaluate at a harmless point (z = mu = 0, sigma = 1) and
    # put -inf back through torch.where, so the zero gradient is not multiplied by an infinite u
    # (nor by inf - inf where z itself is infinite).
    zero = torch.zeros((), dtype=dt, device=z.device)
    zc = torch.where(underflow, zero, zm)
    means = torch.where(underflow, zero, means)
    log_scales = torch.where(underflow, zero, log_scales)
    u = (zc - means) * torch.exp(-log_scales)
    log_n = torch.where(underflow, -math.inf, -0.5 * u * u - log_scales - HALF_LOG_2PI)
    terms = torch.log_softmax(logits, dim=-1) + log_n
    with torch.no_grad():
        dead = torch.isneginf(terms).all(-1, keepdim=True)
    lp = torch.logsumexp(torch.where(dead, torch.zeros_like(terms), terms), dim=-1)
    return torch.where(dead.squeeze(-1), -math.inf, lp)


def mixture_log_prob(
    z: torch.Tensor,
    logits: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    per_dim: bool = False,
) -> torch.Tensor:
    """sum_d log p(z_d) [B] (or [B, D] with per_dim=True)."""
    lp = mixture_log_prob_per_dim(z, logits, means, log_scales)
    return lp if per_dim else lp.sum(-1)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """sum_d log N(z_d; mean_d, exp(log_scale_d)^2) [B] in the accumulation dtype; unit scales when
    ``log_scale`` is None. z, mean (, log_scale) [B, D]."""
    dt = acc_dtype(z.dtype)
    e = z.to(dt) - mean.to(dt)
    if log_scale is None:
        return (-0.5 * e * e - HALF_LOG_2PI).sum(-1)
    ls = log_scale.to(dt)
    # e * exp(-ls), not e / exp(ls): a tiny scale overflows v to inf (log q -> -inf), no inf / inf.
    # The log-scale subtracted last, as in the kernels (acn::gaussian_log_prob).
    v = e * torch.exp(-ls)
    return (-0.5 * v * v - HALF_LOG_2PI - ls).sum(-1)


def acn_kl(
    z: torch.Tensor,
    code: torch.Tensor,
    logits: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    posterior_log_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL estimate log q(z) - log p(z | prior), [B]; q = N(code, I), or N(code, diag(exp(2
    posterior_log_scale))) when given."""
    return gaussian_log_prob(z, code, posterior_log_scale) - mixture_log_prob(z, logits, means, log_scales)


def sq_dist(diff: torch.Tensor) -> torch.Tensor:
    """sum(diff ** 2) over the last dimension by a fixed pairwise tree of elementwise adds.

    Elementwise operations only: every distance is the same sequence of IEEE operations whatever
    the tensor's shape, memory layout or thread count (a reduction kernel is not; its order
    follows the layout), so the distances that select the rows and the differentiable ones that
    are reported agree bit for bit. diff [..., D] -> [...].
    """
    x = diff * diff
    d = x.shape[-1]
    width = 1 << max(d - 1, 0).bit_length()
    if width != d:
        x = torch.nn.functional.pad(x, (0, width - d))  # + 0.0 leaves every sum unchanged
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = x[..., :h] + x[..., h:]
    return x[..., 0]


def _norms(x: torch.Tensor) -> torch.Tensor:
    """Squared row norms [N] of x [N, D] by a plain reduction, in row blocks (only the filter and
    its rounding bound use them, which hold for any summation order)."""
    if x.shape[0] <= 65536:
        return (x * x).sum(1)
    return torch.cat([(x[s:s + 65536] * x[s:s + 65536]).sum(1) for s in range(0, x.shape[0], 65536)])


def _direct(q: torch.Tensor, b: torch.Tensor, fmax: float) -> torch.Tensor:
    """Direct-form distances of q [Q, D] to b [Q, C, D] (or [C, D]), [Q, C]; a finite pair whose
    distance overflows gets ``fmax``."""
    d = sq_dist(q.unsqueeze(1) - b)
    return torch.where(torch.isinf(d), fmax, d)


def _merge(best_d, best_i, d, i, k):
    """The k smallest by (distance, row) of two lists whose rows ascend from best to d, [Q, *]."""
    cat_d, cat_i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
    order = torch.sort(cat_d, dim=1, stable=True).indices[:, :k]
    return cat_d.gather(1, order), cat_i.gather(1, order)


def _exact_all(q, be, rows, excl, k, fmax, chunk_elems):
    """Exact top-k of the queries q [Q, D] over every eligible row (be [N', D], ids ``rows``,
    ascending), tiled over queries and rows so that a [Q', C, D] block has at most
    ``chunk_elems`` elements. Returns (dists, row ids) [Q, k], padded with (+inf, -1)."""
    nq, dim = q.shape
    qb = max(1, min(nq, chunk_elems // (max(dim, 1) * 256)))
    cb = max(1, chunk_elems // (qb * max(dim, 1)))
    out_d = q.new_full((nq, k), math.inf)
    out_i = torch.full((nq, k), -1, dtype=torch.long, device=q.device)
    for a in range(0, nq, qb):
        qq = q[a:a + qb]
        best_d, best_i = out_d[a:a + qb, :0], out_i[a:a + qb, :0]
        for s in range(0, rows.numel(), cb):
            r = rows[s:s + cb]
            d = _direct(qq, be[s:s + cb], fmax)
            if excl is not None:
                d = d.masked_fill(r.unsqueeze(0) == excl[a:a + qb].unsqueeze(1), math.inf)
            best_d, best_i = _merge(best_d, best_i, d, r.expand(qq.shape[0], -1), k)
        m = best_d.shape[1]
        out_d[a:a + qb, :m], out_i[a:a + qb, :m] = best_d, best_i
    return out_d, out_i


def _exact_candidates(q, be, rows, cand, excl, k, fmax, chunk_elems):
    """Exact top-k of q [Q, D] among its candidates, positions cand [Q, C] in be (ids rows[cand]).
    Returns (dists, row ids) [Q, k]."""
    nq, c = cand.shape
    cand = torch.sort(cand, dim=1).values  # ascending rows: the stable sort then ties by row
    qb = max(1, chunk_elems // max(1, c * q.shape[1]))
    out_d, out_i = [], []
    for a in range(0, nq, qb):
        ci = cand[a:a + qb]
        d = _direct(q[a:a + qb], be[ci], fmax)
        ri = rows[ci]
        if excl is not None:
            d = d.masked_fill(ri == excl[a:a + qb].unsqueeze(1), math.inf)
        bd, bi = _merge(d[:, :0], ri[:, :0], d, ri, k)
        out_d.append(bd)
        out_i.append(bi)
    return torch.cat(out_d), torch.cat(out_i)


def _select(q, be, rows, bn, k, excl, fmax, chunk_elems):
    """Rows [Q, k] (-1 = none) of the exact top-k by (direct-form distance, row) of finite
    queries q [Q, D] among the eligible rows be [N', D] (ids ``rows``, ascending; norms bn).

    The expanded form |b|^2 - 2 q.b (one GEMM per tile) only filters: with a rounding bound E on
    it, a row can be among the exact k nearest only if its expanded value is within about 2E of
    the k-th smallest one. The kp smallest expanded values per query (kp = k + max(16, k / 4))
    hold every such row when the kp-th lies beyond that threshold, which is checked; queries where
    it does not (ties, data far from the origin) retry with 4 kp, and at kp >= N' (or where the
    bound is not finite) take the exact distance of every row. Survivors get the exact distance.
    """
    nq, dim = q.shape
    n_ok = rows.numel()
    dt = q.dtype
    out = torch.full((nq, k), -1, dtype=torch.long, device=q.device)
    if nq == 0 or n_ok == 0:
        return out
    eps = torch.finfo(dt).eps
    gam = (dim + 4) * eps  # relative error of a direct-form distance (with 2x room)
    qn = _norms(q)
    # |expanded - exact| <= 2 gamma_D (|q|^2 + |b|^2) for any summation order; 2x room again,
    # plus a few smallest normals for underflow.
    err = 4 * (dim + 4) * eps * (qn + bn.max()) + 64 * torch.finfo(dt).tiny
    todo = torch.arange(nq, device=q.device)
    full = ~torch.isfinite(4 * err)
    kp = min(n_ok, k + max(16, k // 4))
    while True:
        todo = todo[~full[todo]]
        if todo.numel() == 0 or kp >= n_ok:
            break
        ex = excl[todo] if excl is not None else None
        cand_v, cand_i = _approx_topk(q[todo], be, rows, bn, ex, kp, chunk_elems)
        e = err[todo]
        kth = cand_v[:, k - 1] + qn[todo]  # an expanded distance; rounding covered below
        upper = (kth + e) * (1 + gam) * (1 + 4 * eps)  # >= the exact k-th distance
        thr = (upper / (1 - gam) + e) * (1 + 4 * eps) - qn[todo]
        ok = cand_v[:, kp - 1] > thr
        done = todo[ok]
        if done.numel():
            ex = excl[done] if excl is not None else None
            d, i = _exact_candidates(q[done], be, rows, cand_i[ok], ex, k, fmax, chunk_elems)
            out[done] = torch.where(torch.isinf(d), -1, i)
        todo = todo[~ok]
        kp = min(n_ok, 4 * kp)
    rest = torch.cat([todo, full.nonzero().squeeze(1)])
    if rest.numel():
        ex = excl[rest] if excl is not None else None
        d, i = _exact_all(q[rest], be, rows, ex, k, fmax, chunk_elems)
        out[rest] = torch.where(torch.isinf(d), -1, i)
    return out


def _approx_topk(q, be, rows, bn, excl, kp, chunk_elems):
    """The kp smallest expanded values |b|^2 - 2 q.b over the eligible rows be, and the positions
    of those rows in be ([Q, kp] each; +inf for the excluded row), tiled over queries and rows."""
    nq = q.shape[0]
    n_ok = rows.numel()
    qb = min(nq, 1024)
    cb = max(kp, chunk_elems // qb)
    vals, idx = [], []
    for a in range(0, nq, qb):
        qq = q[a:a + qb]
        best_v = best_i = None
        for s in range(0, n_ok, cb):
            v = torch.addmm(bn[s:s + cb], qq, be[s:s + cb].t(), alpha=-2.0)
            if excl is not None:
                v = v.masked_fill(rows[s:s + cb].unsqueeze(0) == excl[a:a + qb].unsqueeze(1), math.inf)
            tv, ti = torch.topk(v, min(kp, v.shape[1]), dim=1, largest=False)
            ti = ti + s
            if best_v is not None:
                tv, o = torch.topk(torch.cat([best_v, tv], 1), kp, dim=1, largest=False)
                ti = torch.cat([best_i, ti], 1).gather(1, o)
            best_v, best_i = tv, ti
        vals.append(best_v)
        idx.append(best_i)
    return torch.cat(vals), torch.cat(idx)


def masked_topk(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    exclude_mask: torch.Tensor | None = None,
    exclude_index: torch.Tensor | None = None,
    chunk_elems: int = 1 << 22,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked top-k by exact direct-form distances, sum_d (q_d - b_d)^2 (:func:`sq_dist`).

    Returns (dists [B, k] in the accumulation dtype, indices [B, k] int64), sorted by
    (distance, row); padding dists=+inf, indices=-1; a finite pair whose distance overflows gets
    the largest finite value of the accumulation dtype. dists are differentiable with respect to
    queries and bank. Work is tiled over queries and bank rows (``chunk_elems`` bounds a
    distance block); see :func:`_select` for the GEMM filter that keeps it fast and exact.
    """
    dt = acc_dtype(queries.dtype)
    fmax = torch.finfo(dt).max
    nb = queries.shape[0]
    # One contiguous copy in the accumulation dtype: the selection and the reported distances
    # are both computed from these values, by the same elementwise arithmetic.
    qa, ba = queries.to(dt).contiguous(), bank.to(dt).contiguous()
    q, bk = qa.detach(), ba.detach()
    # A row holding NaN or inf has a non-finite norm; a non-finite norm of a finite row (overflow)
    # is rare, so only those rows get the elementwise check.
    bn = _norms(bk)
    eligible = torch.isfinite(bn)
    odd = (~eligible).nonzero().squeeze(1)
    if odd.numel():
        eligible[odd] = torch.isfinite(bk[odd]).all(1)
    if exclude_mask is not None:
        eligible = eligible & ~exclude_mask
    rows = eligible.nonzero().squeeze(1)
    # The eligible rows, compacted once (a copy only where some row is not eligible).
    be, bn = (bk, bn) if rows.numel() == bk.shape[0] else (bk[rows], bn[rows])
    live = torch.isfinite(q).all(1).nonzero().squeeze(1)  # a non-finite query is never paired
    best_i = torch.full((nb, k), -1, dtype=torch.long, device=q.device)
    excl = exclude_index[live] if exclude_index is not None else None
    best_i[live] = _select(q[live], be, rows, bn, k, excl, fmax, chunk_elems)
    # Differentiable distances of the selected pairs; padded entries are cut off before the
    # arithmetic so that their (zero) gradient cannot pick up a NaN from the row they point at.
    valid = best_i >= 0
    diff = torch.where(valid.unsqueeze(-1), qa.unsqueeze(1) - ba[best_i.clamp_min(0)], 0.0)
    exact = sq_dist(diff)
    exact = torch.where(torch.isinf(exact), fmax, exact)
    dists = torch.where(valid, exact, math.inf)
    return dists, best_i


def pick_slot(u: float, n: int) -> int:
    """floor(u * n) for a uniform u, clamped into [0, n - 1] (NaN gives 0): the pick among n
    options (csrc/include/resolve_neighbours.h)."""
    x = u * n
    if not x >= 1.0:
        return 0
    return n - 1 if x >= n else int(x)


def resolve_neighbours(
    candidates: torch.Tensor,
    index: torch.Tensor,
    uniforms: torch.Tensor,
    k: int,
    fallback: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch-order walk over candidate lists, one query at a time on the host (the resolution
    loop :class:`~acn_kernels.CodeBank` ran before the fused op), as docs/design.md's
    "resolve_neighbours" states it.

    candidates [B, C] int64 (negative entries are padding), index [B] int64 (the own rows),
    uniforms [B] float32/float64, k >= 1, fallback [B, F] int64 or None. Returns (picks, taken,
    status), each [B] int64 on the candidates' device.
    """
    b = candidates.shape[0]
    cand, own, u = candidates.tolist(), index.tolist(), uniforms.double().tolist()
    fb = None if fallback is None else fallback.tolist()
    picks, taken_out, status = [-1] * b, [-1] * b, [NEEDS_SEARCH] * b
    taken: set[int] = set()
    for q in range(b):
        mine = [r for r in cand[q] if r >= 0 and r != own[q] and r not in taken][:k]
        if len(mine) < k and cand[q] and cand[q][-1] >= 0:
            break  # a full list that lost too many: this query and every later one search again
        if mine:
            picks[q] = taken_out[q] = mine[pick_slot(u[q], len(mine))]
            taken.add(picks[q])
            status[q] = RESOLVED
            continue
        status[q] = FALLBACK
        if fb is not None:
            rest = [r for r in fb[q] if r >= 0 and r != own[q]]
            if rest:
                picks[q] = rest[pick_slot(u[q], len(rest))]
    return tuple(torch.tensor(x, dtype=torch.int64, device=candidates.device)
                 for x in (picks, taken_out, status))
