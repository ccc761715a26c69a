"""The public ops: check the arguments once (:mod:`acn_kernels.checks`), pick the backend from the
capability table (:mod:`acn_kernels.dispatch`), call it. The contracts are docs/design.md's
"masked_topk", "mixture_log_prob and acn_kl" and "resolve_neighbours" sections.

The compiled backends are torch.library ops with fake kernels and autograd
(:mod:`acn_kernels.registration`): ``acn_kernels::mixture_fwd`` / ``mixture_bwd`` /
``masked_topk`` / ``resolve_neighbours`` (C++, CPU and CUDA) and ``acn_kernels::triton_*`` (:mod:`acn_kernels.triton`,
imported on first use). "torch" is :mod:`acn_kernels.reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import reference, registration  # noqa: F401  (registration: fake kernels and autograd of _C)
from .checks import MAX_K, check_masked_topk, check_mixture, check_resolve_neighbours
from .dispatch import resolve


class MaskedTopK(NamedTuple):
    """Result of :func:`masked_topk`: dists [B, k] squared Euclidean distances (float32, float64
    for float64 input), indices [B, k] int64; padding dists=+inf, indices=-1."""

    dists: torch.Tensor
    indices: torch.Tensor


def _op(backend: str, name: str):
    """The registered op ``name`` of a compiled backend (its Triton module imported on first use,
    with a plain import statement, which torch.compile can trace)."""
    if backend != "triton":
        return getattr(torch.ops.acn_kernels, name)
    if name == "masked_topk":
        from .triton import masked_topk  # noqa: F401  (registers acn_kernels::triton_masked_topk)
    else:
        from .triton import mixture  # noqa: F401  (registers acn_kernels::triton_mixture_fwd/_bwd)
    return getattr(torch.ops.acn_kernels, f"triton_{name}")


def _mixture(z, code, logits, means, log_scales, per_dim, backend, posterior_log_scale=None):
    be = resolve("mixture", backend, z.device, z.dtype)
    if be == "torch":
        if code is None:
            return reference.mixture_log_prob(z, logits, means, log_scales, per_dim)
        return reference.acn_kl(z, code, logits, means, log_scales, posterior_log_scale)
    return _op(be, "mixture_fwd")(z, logits, means, log_scales, code, per_dim, posterior_log_scale)[0]


def mixture_log_prob(
    z: torch.Tensor,
    logits: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    *,
    per_dim: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """log p(z) under a per-dimension mixture of Gaussians (docs/design.md, "mixture_log_prob
    and acn_kl").

    Args:
        z: [B, D] floating point; logits, means, log_scales: [B, D, M], same dtype and device.
        per_dim: return [B, D] instead of the sum over D.
        backend: "cpu", "cuda", "triton", "torch" or None (automatic; see ACN_KERNELS_BACKEND).

    Returns:
        [B] (or [B, D]) float32, float64 for float64 inputs. Differentiable in all inputs.
    """
    check_mixture(z, logits, means, log_scales)
    return _mixture(z, None, logits, means, log_scales, per_dim, backend)


def acn_kl(
    z: torch.Tensor,
    code: torch.Tensor,
    logits: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    *,
    posterior_log_scale: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The one-sample ACN KL estimate log q(z) - log p(z | logits, means, log_scales), [B].

    z, code [B, D]; the mixture parameters [B, D, M], as in :func:`mixture_log_prob`. q is
    N(code, I), or with ``posterior_log_scale`` [B, D] the diagonal Gaussian
    N(code, diag(exp(2 posterior_log_scale))). Its expectation over z ~ q is KL(q || p); at a
    fixed z (z = code in evaluation) it is not the KL (docs/design.md; :func:`gaussian_kl` is the
    closed form for M = 1). Differentiable in every input, ``posterior_log_scale`` included; on
    the compiled backends log q and log p are one fused kernel, and the gradients one fused
    backward.
    """
    check_mixture(z, logits, means, log_scales, code, need_code=True, posterior_log_scale=posterior_log_scale)
    return _mixture(z, code, logits, means, log_scales, False, backend, posterior_log_scale)


def masked_topk(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    *,
    exclude_mask: torch.Tensor | None = None,
    exclude_index: torch.Tensor | None = None,
    backend: str | None = None,
    check_index: bool = True,
) -> MaskedTopK:
    """The k nearest eligible bank rows of each query, by squared Euclidean distance
    (docs/design.md, "masked_topk").

    Args:
        queries: [B, D]; bank: [N, D]; same floating dtype and device; any strides.
        k: an integer, 1 <= k <= min(N, MAX_K).
        exclude_mask: optional [N] bool; True = never return this row.
        exclude_index: optional [B] int64; the one row query b skips, -1 for none. Values outside
            [-1, N) raise (validated here, with one device sync on GPU).
        backend: "cpu", "cuda", "triton", "torch" or None (automatic).
        check_index: False skips the exclude_index value check (and its device sync) for a
            caller that built the values in [-1, N) itself, e.g. the code bank.

    Returns:
        MaskedTopK(dists [B, k] float32 (float64 for float64 input), indices [B, k] int64),
        ascending by (distance, row), padded with (+inf, -1). dists are differentiable with
        respect to queries and bank.
    """
    k = check_masked_topk(queries, bank, k, exclude_mask, exclude_index, values=check_index)
    be = resolve("masked_topk", backend, queries.device, queries.dtype, bank.shape[0])
    if be == "torch":
        return MaskedTopK(*reference.masked_topk(queries, bank, k, exclude_mask, exclude_index))
    return MaskedTopK(*_op(be, "masked_topk")(queries, bank, k, exclude_mask, exclude_index))


class ResolvedNeighbours(NamedTuple):
    """Result of :func:`resolve_neighbours`, each [B] int64: picks (the row each query picked,
    -1 where none), taken (the row each query took from later queries: its pick where status is
    RESOLVED, else -1) and status (:data:`~acn_kernels.checks.RESOLVED`, ``NEEDS_SEARCH`` or
    ``FALLBACK``)."""

    picks: torch.Tensor
    taken: torch.Tensor
    status: torch.Tensor


def resolve_neighbours(
    candidates: torch.Tensor,
    index: torch.Tensor,
    uniforms: torch.Tensor,
    k: int,
    *,
    fallback: torch.Tensor | None = None,
    backend: str | None = None,
) -> ResolvedNeighbours:
    """Resolve one neighbour per query in batch order (docs/design.md, "resolve_neighbours").

    Query b, in order, keeps the first k entries of its candidate list that are rows (>= 0), not
    its own row ``index[b]`` and not taken by queries 0..b-1 of this call, and picks survivor
    floor(u_b * n_b) of its n_b of them. A query whose list was full (last entry >= 0) but kept
    fewer than k stops the walk: it and every later query get NEEDS_SEARCH. A query left with no
    survivor gets FALLBACK and picks from its ``fallback`` list (its own row skipped), taking
    nothing. Runs on the device without reading anything on the host.

    Args:
        candidates: [B, C] int64, each row a masked_topk index list (-1 padded) searched with
            K + headroom entries, the used rows masked and the own row excluded.
        index: [B] int64, the queries' own rows.
        uniforms: [B] float32 or float64, the picks' uniforms in [0, 1) (others are clamped).
        k: K, an integer in [1, MAX_K].
        fallback: optional [B, F] int64, the end-of-pass candidates of every query.
        backend: "cpu", "cuda", "torch" or None (automatic; there is no Triton kernel).

    Returns:
        :class:`ResolvedNeighbours` (picks, taken, status), each [B] int64.
    """
    k = check_resolve_neighbours(candidates, index, uniforms, k, fallback)
    be = resolve("resolve_neighbours", backend, candidates.device, uniforms.dtype)
    if be == "torch":
        return ResolvedNeighbours(*reference.resolve_neighbours(candidates, index, uniforms, k, fallback))
    return ResolvedNeighbours(*_op(be, "resolve_neighbours")(candidates, index, uniforms, k, fallback))


__all__ = ["MAX_K", "MaskedTopK", "ResolvedNeighbours", "acn_kl", "masked_topk", "mixture_log_prob",
           "resolve_neighbours"]
