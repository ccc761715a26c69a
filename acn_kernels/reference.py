"""Plain-PyTorch implementations of the ops: the "torch" backend and the oracle of the tests.

Differentiable through autograd, float64-capable, and written for clarity over speed. Both follow
the contracts of docs/design.md exactly (masks, ties, padding, -inf rows), so every kernel is compared
against them.
"""

from __future__ import annotations

import math

import torch

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
    # Where the density is exactly zero, evaluate at a harmless point and put -inf back through
    # torch.where, so the zero gradient is not multiplied by an infinite u.
    means = torch.where(underflow, zm.detach(), means)
    log_scales = torch.where(underflow, torch.zeros_like(log_scales), log_scales)
    u = (zm - means) * torch.exp(-log_scales)
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
    v = e * torch.exp(-ls)
    return (-0.5 * v * v - ls - HALF_LOG_2PI).sum(-1)


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


def _eligible_dists(q: torch.Tensor, b: torch.Tensor, fmax: float) -> torch.Tensor:
    """Exact squared distances [B, C] ((q - b)^2 summed, no expansion); +inf where a side is not
    finite; a finite pair that overflows gets ``fmax``."""
    d = (q.unsqueeze(1) - b.unsqueeze(0)).square().sum(-1)
    d = torch.where(torch.isinf(d), torch.full_like(d, fmax), d)
    ok = torch.isfinite(q).all(-1).unsqueeze(1) & torch.isfinite(b).all(-1).unsqueeze(0)
    return torch.where(ok, d, torch.full_like(d, math.inf))


def masked_topk(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    exclude_mask: torch.Tensor | None = None,
    exclude_index: torch.Tensor | None = None,
    chunk_elems: int = 1 << 22,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked top-k by exact distances, bank chunk by chunk (never B x N at once).

    Returns (dists [B, k] in the accumulation dtype, indices [B, k] int64), sorted by
    (distance, row); padding dists=+inf, indices=-1. dists are differentiable with respect to
    queries and bank (recomputed from the selected rows).
    """
    dt = acc_dtype(queries.dtype)
    fmax = torch.finfo(torch.float32).max if dt == torch.float32 else torch.finfo(dt).max
    nb, dim = queries.shape
    n = bank.shape[0]
    q = queries.detach().to(dt)
    bk = bank.detach().to(dt)
    best_d = torch.full((nb, 0), math.inf, dtype=dt, device=q.device)
    best_i = torch.full((nb, 0), -1, dtype=torch.long, device=q.device)
    step = max(1, chunk_elems // max(1, nb * max(dim, 1)))
    for s in range(0, n, step):
        e = min(n, s + step)
        d = _eligible_dists(q, bk[s:e], fmax)
        idx = torch.arange(s, e, device=q.device).expand(nb, -1)
        if exclude_mask is not None:
            d = d.masked_fill(exclude_mask[s:e].unsqueeze(0), math.inf)
        if exclude_index is not None:
            d = d.masked_fill(idx == exclude_index.unsqueeze(1), math.inf)
        # Earlier chunks hold smaller rows, so a stable sort by distance breaks ties by row.
        cat_d = torch.cat([best_d, d], 1)
        cat_i = torch.cat([best_i, idx], 1)
        order = torch.sort(cat_d, dim=1, stable=True).indices[:, :k]
        best_d, best_i = cat_d.gather(1, order), cat_i.gather(1, order)
    pad = torch.isinf(best_d)
    best_i = best_i.masked_fill(pad, -1)
    if best_d.shape[1] < k:  # only when N < k, which the public op rejects; kept for shards
        extra = k - best_d.shape[1]
        best_d = torch.cat([best_d, best_d.new_full((nb, extra), math.inf)], 1)
        best_i = torch.cat([best_i, best_i.new_full((nb, extra), -1)], 1)
    # Differentiable distances of the selected pairs; padded entries are cut off before the
    # arithmetic so that their (zero) gradient cannot pick up a NaN from the row they point at.
    valid = best_i >= 0
    sel = bank.to(dt)[best_i.clamp_min(0)]
    diff = torch.where(valid.unsqueeze(-1), queries.to(dt).unsqueeze(1) - sel, 0.0)
    exact = diff.square().sum(-1)
    exact = torch.where(torch.isinf(exact), torch.full_like(exact, fmax), exact)
    dists = torch.where(valid, exact, torch.full_like(exact, math.inf))
    return dists, best_i
