"""The argument checks of every op, written once and shared by every backend (docs/design.md,
"Backends and dispatch"). Messages name the argument.

The public functions of :mod:`acn_kernels.ops` call them before dispatch, and the Triton ops call
them again at their own boundary (they are callable directly as ``torch.ops.acn_kernels.*``). The
C++ ops check the same structure in C++ (csrc/checks.cpp), because they too are callable directly
and must never read out of bounds whatever they are given.
"""

from __future__ import annotations

import operator

import torch

MAX_K: int = 1024
"""The largest k that masked_topk accepts, the same on every backend (csrc/utils.h kMaxK)."""


def _describe(x: object) -> str:
    """A short description of a bad argument: its dtype and shape for tensors, else its type."""
    if isinstance(x, torch.Tensor):
        return f"a {str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def check_float(t: object, name: str) -> None:
    """``t`` is a floating-point tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_describe(t)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_like(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_pair(t: object, name: str, ref: torch.Tensor, ref_name: str) -> None:
    """``t`` is a floating tensor with ``ref``'s shape, dtype and device."""
    check_float(t, name)
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")
    _check_like(t, name, ref, ref_name)


def check_mixture(
    z: object,
    logits: object,
    means: object,
    log_scales: object,
    code: object = None,
    *,
    need_code: bool = False,
    posterior_log_scale: object = None,
) -> None:
    """z [B, D]; logits, means, log_scales [B, D, M] with M >= 1; code [B, D] (required when
    ``need_code``, i.e. for acn_kl); posterior_log_scale [B, D] or None (only with code); one
    floating dtype and one device for all."""
    check_float(z, "z")
    if z.dim() != 2:
        raise ValueError(f"z must have shape [B, D], got {tuple(z.shape)}")
    m = None
    for name, t in (("logits", logits), ("means", means), ("log_scales", log_scales)):
        check_float(t, name)
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [B, D, M], got {tuple(t.shape)}")
        if t.shape[:2] != z.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but z has shape {tuple(z.shape)}")
        if m is None:
            m = t.shape[2]
            if m == 0:
                raise ValueError("logits must have at least one component (M >= 1)")
        elif t.shape[2] != m:
            raise ValueError(f"{name} has {t.shape[2]} components but logits has {m}")
        _check_like(t, name, z, "z")
    if code is None:
        if need_code or posterior_log_scale is not None:
            raise TypeError("code must be a [B, D] tensor (the posterior mean), got None")
        return
    check_float(code, "code")
    if code.shape != z.shape:
        raise ValueError(f"code has shape {tuple(code.shape)} but z has shape {tuple(z.shape)}")
    _check_like(code, "code", z, "z")
    if posterior_log_scale is not None:
        _check_pair(posterior_log_scale, "posterior_log_scale", z, "z")


def check_int(value: object, name: str) -> int:
    """``value`` as a Python int: any integer (int, numpy integer or 0-dim integer tensor), not a
    bool, a float or a string; the TypeError names ``name``."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor)
                                   and (value.dim() or not _is_integer_dtype(value.dtype))):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {_describe(value)}") from None


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_k(k: object, n: int) -> int:
    """k as a Python int: any integer (see :func:`check_int`) with 1 <= k <= min(n, MAX_K)."""
    k = check_int(k, "k")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > MAX_K:
        raise ValueError(f"k={k} is above acn_kernels.MAX_K={MAX_K}")
    if k > n:
        raise ValueError(f"k={k} is larger than the bank (N={n})")
    return k


def check_exclude_index(exclude_index: object, b: int, n: int, device: torch.device, *, values: bool = True) -> None:
    """exclude_index [B] int64 on ``device``; with ``values``, every value in [-1, N) (one device
    sync on GPU, skipped while compiling)."""
    if not isinstance(exclude_index, torch.Tensor) or exclude_index.dtype != torch.int64:
        raise TypeError(f"exclude_index must be an int64 tensor, got {_describe(exclude_index)}")
    if exclude_index.shape != (b,):
        raise ValueError(f"exclude_index must have shape [B] = [{b}], got {tuple(exclude_index.shape)}")
    if exclude_index.device != device:
        raise ValueError(f"exclude_index is on {exclude_index.device} but queries is on {device}")
    if values and exclude_index.numel() and not torch.compiler.is_compiling():
        lo, hi = int(exclude_index.min()), int(exclude_index.max())
        if lo < -1 or hi >= n:
            raise ValueError(f"exclude_index values must lie in [-1, N) = [-1, {n}), got min {lo}, max {hi}")


def check_masked_topk(
    queries: object,
    bank: object,
    k: object,
    exclude_mask: object,
    exclude_index: object,
    *,
    values: bool = True,
) -> int:
    """queries [B, D], bank [N, D] (one floating dtype, one device), k (see :func:`check_k`),
    exclude_mask [N] bool or None, exclude_index [B] int64 or None. With ``values``, also the
    exclude_index values in [-1, N): one device sync on GPU, skipped while compiling. Returns k
    as an int."""
    check_float(queries, "queries")
    check_float(bank, "bank")
    if queries.dim() != 2:
        raise ValueError(f"queries must have shape [B, D], got {tuple(queries.shape)}")
    if bank.dim() != 2:
        raise ValueError(f"bank must have shape [N, D], got {tuple(bank.shape)}")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank has D={bank.shape[1]} but queries has D={queries.shape[1]}")
    _check_like(bank, "bank", queries, "queries")
    n, b = bank.shape[0], queries.shape[0]
    k = check_k(k, n)
    if exclude_mask is not None:
        if not isinstance(exclude_mask, torch.Tensor) or exclude_mask.dtype != torch.bool:
            raise TypeError(f"exclude_mask must be a bool tensor, got {_describe(exclude_mask)}")
        if exclude_mask.shape != (n,):
            raise ValueError(f"exclude_mask must have shape [N] = [{n}], got {tuple(exclude_mask.shape)}")
        if exclude_mask.device != queries.device:
            raise ValueError(f"exclude_mask is on {exclude_mask.device} but queries is on {queries.device}")
    if exclude_index is not None:
        check_exclude_index(exclude_index, b, n, queries.device, values=values)
    return k


RESOLVED: int = 0
"""resolve_neighbours status: the query picked one of its candidates, and took that row."""
NEEDS_SEARCH: int = 1
"""resolve_neighbours status: the query lost so many candidates to earlier queries that its full
list kept fewer than k, or it follows such a query; search again with the earlier picks masked."""
FALLBACK: int = 2
"""resolve_neighbours status: no eligible candidate was left (the end-of-pass fallback)."""


def _check_rows(t: object, name: str, shape: str, dim: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor, got {_describe(t)}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def check_resolve_neighbours(candidates: object, index: object, uniforms: object, k: object,
                             fallback: object) -> int:
    """candidates [B, C] int64, index [B] int64, uniforms [B] float32 or float64, k (an integer in
    [1, MAX_K], see :func:`check_k`), fallback [B, F] int64 or None; one device. No value is
    checked (nothing is read on the host): every int64 is a valid entry. Returns k as an int."""
    _check_rows(candidates, "candidates", "[B, C]", 2)
    b = candidates.shape[0]
    _check_rows(index, "index", "[B]", 1)
    if index.shape != (b,):
        raise ValueError(f"index must have shape [B] = [{b}], got {tuple(index.shape)}")
    if not isinstance(uniforms, torch.Tensor) or uniforms.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"uniforms must be a float32 or float64 tensor, got {_describe(uniforms)}")
    if uniforms.shape != (b,):
        raise ValueError(f"uniforms must have shape [B] = [{b}], got {tuple(uniforms.shape)}")
    k = check_k(k, MAX_K)
    for name, t in (("index", index), ("uniforms", uniforms)):
        if t.device != candidates.device:
            raise ValueError(f"{name} is on {t.device} but candidates is on {candidates.device}")
    if fallback is not None:
        _check_rows(fallback, "fallback", "[B, F]", 2)
        if fallback.shape[0] != b:
            raise ValueError(f"fallback must have shape [B, F] with B = {b}, got {tuple(fallback.shape)}")
        if fallback.device != candidates.device:
            raise ValueError(f"fallback is on {fallback.device} but candidates is on {candidates.device}")
    return k


def check_one_gaussian(mean: object, log_scale: object) -> None:
    """mean, log_scale [B, D], one floating dtype and device (as_mixture)."""
    check_float(mean, "mean")
    if mean.dim() != 2:
        raise ValueError(f"mean must have shape [B, D], got {tuple(mean.shape)}")
    _check_pair(log_scale, "log_scale", mean, "mean")


def check_gaussian_kl(code: object, prior_mean: object, prior_log_scale: object, posterior_log_scale: object) -> None:
    """code [B, D]; prior_mean, prior_log_scale [B, D] or [B, D, 1]; posterior_log_scale [B, D] or
    None; one floating dtype and device (gaussian_kl)."""
    check_float(code, "code")
    if code.dim() != 2:
        raise ValueError(f"code must have shape [B, D], got {tuple(code.shape)}")
    check_float(prior_mean, "prior_mean")
    if prior_mean.shape not in (code.shape, (*code.shape, 1)):
        raise ValueError(f"prior_mean must have shape [B, D] or [B, D, 1] (one Gaussian per dimension) with "
                         f"[B, D] = {list(code.shape)}, got {tuple(prior_mean.shape)}")
    _check_like(prior_mean, "prior_mean", code, "code")
    _check_pair(prior_log_scale, "prior_log_scale", prior_mean, "prior_mean")
    if posterior_log_scale is not None:
        _check_pair(posterior_log_scale, "posterior_log_scale", code, "code")
