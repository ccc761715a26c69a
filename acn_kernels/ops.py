"""The public ops, their argument checks, and the torch.library registration of the compiled ones.

Every backend computes the same function (DESIGN.md). The compiled backends are torch.library
ops: ``acn_kernels::mixture_fwd`` / ``mixture_bwd`` / ``masked_topk`` (C++ schemas in csrc/ops.cpp,
CPU and CUDA implementations) and ``acn_kernels::triton_*`` (torch.library.custom_op, in
triton_mixture.py / triton_topk.py). Here each gets a fake kernel (for torch.compile and opcheck)
and an autograd formula.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _ext, reference
from ._backend import resolve

MAX_K: int = 1024
"""The largest k that masked_topk accepts, the same on every backend."""


class MaskedTopK(NamedTuple):
    """Result of :func:`masked_topk`: dists [B, k] (float32, float64 for float64 input), indices
    [B, k] int64; padding dists=+inf, indices=-1."""

    dists: torch.Tensor
    indices: torch.Tensor


# --------------------------------------------------------------------------------------------
# Argument checks (shared by all backends; messages name the argument)


def _check_float(t: object, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_mixture(z: torch.Tensor, params: dict[str, torch.Tensor], code: torch.Tensor | None) -> None:
    _check_float(z, "z")
    if z.dim() != 2:
        raise ValueError(f"z must have shape [B, D], got {tuple(z.shape)}")
    m = None
    for name, t in params.items():
        _check_float(t, name)
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
        if t.dtype != z.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but z has dtype {z.dtype}")
        if t.device != z.device:
            raise ValueError(f"{name} is on {t.device} but z is on {z.device}")
    if code is not None:
        _check_float(code, "code")
        if code.shape != z.shape:
            raise ValueError(f"code has shape {tuple(code.shape)} but z has shape {tuple(z.shape)}")
        if code.dtype != z.dtype:
            raise TypeError(f"code has dtype {code.dtype} but z has dtype {z.dtype}")
        if code.device != z.device:
            raise ValueError(f"code is on {code.device} but z is on {z.device}")


def _check_topk(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    exclude_mask: torch.Tensor | None,
    exclude_index: torch.Tensor | None,
) -> None:
    _check_float(queries, "queries")
    _check_float(bank, "bank")
    if queries.dim() != 2:
        raise ValueError(f"queries must have shape [B, D], got {tuple(queries.shape)}")
    if bank.dim() != 2:
        raise ValueError(f"bank must have shape [N, D], got {tuple(bank.shape)}")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank has D={bank.shape[1]} but queries has D={queries.shape[1]}")
    if bank.dtype != queries.dtype:
        raise TypeError(f"bank has dtype {bank.dtype} but queries has dtype {queries.dtype}")
    if bank.device != queries.device:
        raise ValueError(f"bank is on {bank.device} but queries is on {queries.device}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > MAX_K:
        raise ValueError(f"k={k} is above acn_kernels.MAX_K={MAX_K}")
    if k > bank.shape[0]:
        raise ValueError(f"k={k} is larger than the bank (N={bank.shape[0]})")
    if exclude_mask is not None:
        if not isinstance(exclude_mask, torch.Tensor) or exclude_mask.dtype != torch.bool:
            raise TypeError(f"exclude_mask must be a bool tensor, got {getattr(exclude_mask, 'dtype', exclude_mask)}")
        if exclude_mask.shape != (bank.shape[0],):
            raise ValueError(
                f"exclude_mask must have shape [N] = [{bank.shape[0]}], got {tuple(exclude_mask.shape)}"
            )
        if exclude_mask.device != queries.device:
            raise ValueError(f"exclude_mask is on {exclude_mask.device} but queries is on {queries.device}")
    if exclude_index is not None:
        if not isinstance(exclude_index, torch.Tensor) or exclude_index.dtype != torch.int64:
            got = getattr(exclude_index, "dtype", exclude_index)
            raise TypeError(f"exclude_index must be an int64 tensor, got {got}")
        if exclude_index.shape != (queries.shape[0],):
            raise ValueError(
                f"exclude_index must have shape [B] = [{queries.shape[0]}], got {tuple(exclude_index.shape)}"
            )
        if exclude_index.device != queries.device:
            raise ValueError(f"exclude_index is on {exclude_index.device} but queries is on {queries.device}")
        # The one value check: a device sync on GPU (documented). Skipped while tracing.
        if exclude_index.numel() and not torch.compiler.is_compiling():
            lo, hi = int(exclude_index.min()), int(exclude_index.max())
            if lo < -1 or hi >= bank.shape[0]:
                raise ValueError(
                    f"exclude_index values must lie in [-1, N) = [-1, {bank.shape[0]}), got min {lo}, max {hi}"
                )


# --------------------------------------------------------------------------------------------
# Registration helpers (also used by the Triton modules for their custom ops)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return reference.acc_dtype(dtype)


def register_mixture(fwd_name: str, bwd_name: str) -> None:
    """Fake kernels and autograd for a (mixture_fwd, mixture_bwd) pair with the csrc/ops.cpp schema."""
    bwd = getattr(torch.ops.acn_kernels, bwd_name.split("::")[-1])

    @torch.library.register_fake(fwd_name)
    def _fwd_fake(z, logits, means, log_scales, code, per_dim):
        torch._check(logits.shape[:2] == z.shape)
        acc = _acc(z.dtype)
        out = z.new_empty(z.shape, dtype=acc) if per_dim else z.new_empty(z.shape[:1], dtype=acc)
        return out, z.new_empty((*z.shape, 2), dtype=acc)

    @torch.library.register_fake(bwd_name)
    def _bwd_fake(grad_out, z, logits, means, log_scales, code, lse, per_dim):
        dcode = torch.empty_like(z) if code is not None else z.new_empty((0,))
        return (torch.empty_like(z), torch.empty_like(logits), torch.empty_like(means),
                torch.empty_like(log_scales), dcode)

    def setup_context(ctx, inputs, output):
        z, logits, means, log_scales, code, per_dim = inputs
        ctx.save_for_backward(z, logits, means, log_scales, code, output[1])
        ctx.per_dim = per_dim
        ctx.has_code = code is not None
        ctx.set_materialize_grads(False)  # lse has no gradient: no [B, D, 2] of zeros per call

    def backward(ctx, grad_out, _grad_lse):
        if grad_out is None:  # only lse was used; it is not differentiated
            return None, None, None, None, None, None
        z, logits, means, log_scales, code, lse = ctx.saved_tensors
        dz, dl, dm, ds, dc = bwd(grad_out.contiguous(), z, logits, means, log_scales,
                                 code if ctx.has_code else None, lse, ctx.per_dim)
        return dz, dl, dm, ds, (dc if ctx.has_code else None), None

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)

    # The fused backward has no derivative of its own: without this, a double backward through
    # it only warns and returns zeros. (The "torch" backend is plain autograd and supports it.)
    def double_backward(ctx, *grads):
        raise RuntimeError(
            f"{bwd_name} has no derivative: double backward (create_graph=True and a gradient of "
            "the gradient) through mixture_log_prob / acn_kl is not supported on the compiled "
            "backends; use backend='torch' for higher-order gradients"
        )

    torch.library.register_autograd(bwd_name, double_backward, setup_context=lambda ctx, inputs, output: None)


def topk_backward_dists(
    grad: torch.Tensor, queries: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of dists = ||q_b - bank_i||^2 with respect to queries and bank (zero at padding).

    Plain torch ops (a gather and an index_add), deterministic on CPU.
    """
    acc = _acc(queries.dtype)
    valid = indices >= 0
    rows = indices.clamp_min(0)
    sel = bank.to(acc)[rows]  # [B, k, D]
    g = torch.where(valid, grad.to(acc), 0.0).unsqueeze(-1)
    diff = torch.where(valid.unsqueeze(-1), queries.to(acc).unsqueeze(1) - sel, 0.0) * (2.0 * g)
    gq = diff.sum(1)
    gb = torch.zeros(bank.shape, dtype=acc, device=bank.device)
    gb.index_add_(0, rows.reshape(-1), -diff.reshape(-1, bank.shape[1]))
    return gq.to(queries.dtype), gb.to(bank.dtype)


def register_topk(name: str) -> None:
    """Fake kernel and autograd for a masked_topk op with the csrc/ops.cpp schema."""

    @torch.library.register_fake(name)
    def _fake(queries, bank, k, exclude_mask, exclude_index):
        shape = (queries.shape[0], k)
        return (queries.new_empty(shape, dtype=_acc(queries.dtype)),
                queries.new_empty(shape, dtype=torch.int64))

    def setup_context(ctx, inputs, output):
        queries, bank = inputs[0], inputs[1]
        ctx.save_for_backward(queries, bank, output[1])

    def backward(ctx, grad_dists, _grad_idx):
        queries, bank, indices = ctx.saved_tensors
        gq, gb = topk_backward_dists(grad_dists, queries, bank, indices)
        return gq, gb, None, None, None

    torch.library.register_autograd(name, backward, setup_context=setup_context)


if _ext.C is not None:
    assert int(_ext.C.MAX_K) == MAX_K, "csrc/utils.h kMaxK and acn_kernels.MAX_K disagree"
    register_mixture("acn_kernels::mixture_fwd", "acn_kernels::mixture_bwd")
    register_topk("acn_kernels::masked_topk")


def _triton_module(name: str):
    if name == "mixture":
        from . import triton_mixture as mod
    else:
        from . import triton_topk as mod
    return mod


# --------------------------------------------------------------------------------------------
# Public ops


def _mixture(z, code, logits, means, log_scales, per_dim, backend):
    be = resolve("mixture", backend, z.device)
    if be == "torch":
        if code is None:
            return reference.mixture_log_prob(z, logits, means, log_scales, per_dim)
        return reference.acn_kl(z, code, logits, means, log_scales)
    if be == "triton":
        _triton_module("mixture")
        op = torch.ops.acn_kernels.triton_mixture_fwd
    else:
        op = torch.ops.acn_kernels.mixture_fwd
    return op(z, logits, means, log_scales, code, per_dim)[0]


def mixture_log_prob(
    z: torch.Tensor,
    logits: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    *,
    per_dim: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """log p(z) under a per-dimension mixture of Gaussians.

    Args:
        z: [B, D] float32/float16/bfloat16 (float64 on "cpu" and "torch").
        logits, means, log_scales: [B, D, M], same dtype and device as z. Mixture weights are
            softmax(logits) over M; scales are exp(log_scales) (standard deviations). The op does
            not clamp log_scales.
        per_dim: return [B, D] instead of the sum over D.
        backend: "cpu", "cuda", "triton", "torch" or None (automatic; see ACN_KERNELS_BACKEND).

    Returns:
        [B] (or [B, D]) float32, float64 for float64 inputs. -inf where every term of a dimension
        is -inf (with zero gradients); NaN where an input is NaN. Differentiable in all inputs.
    """
    _check_mixture(z, {"logits": logits, "means": means, "log_scales": log_scales}, None)
    return _mixture(z, None, logits, means, log_scales, per_dim, backend)


def acn_kl(
    z: torch.Tensor,
    code: torch.Tensor,
    logits: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """The ACN KL estimate log N(z; code, I) - log p(z | logits, means, log_scales), [B].

    z, code [B, D]; the mixture parameters [B, D, M], as in :func:`mixture_log_prob`. Fused in one
    kernel on the compiled backends; differentiable in all five inputs.
    """
    _check_mixture(z, {"logits": logits, "means": means, "log_scales": log_scales}, code)
    return _mixture(z, code, logits, means, log_scales, False, backend)


def masked_topk(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    *,
    exclude_mask: torch.Tensor | None = None,
    exclude_index: torch.Tensor | None = None,
    backend: str | None = None,
) -> MaskedTopK:
    """The k nearest eligible bank rows of each query, by squared Euclidean distance.

    Args:
        queries: [B, D]; bank: [N, D]; same dtype (float32/float16/bfloat16; float64 on "cpu"
            and "torch") and device. Non-contiguous inputs are accepted.
        k: 1 <= k <= min(N, MAX_K).
        exclude_mask: optional [N] bool; True = never return this row.
        exclude_index: optional [B] int64; the one row query b skips, -1 for none. Values outside
            [-1, N) raise (validated here, with one device sync on GPU).
        backend: "cpu", "cuda", "triton", "torch" or None (automatic).

    Returns:
        MaskedTopK(dists [B, k] float32 (float64 for float64 input), indices [B, k] int64),
        ascending by (distance, row). A query or row holding NaN/inf is never paired; a finite
        distance that overflows float32 is FLT_MAX; where fewer than k rows are eligible the tail
        is dists=+inf, indices=-1. dists are differentiable with respect to queries and bank.
    """
    _check_topk(queries, bank, k, exclude_mask, exclude_index)
    be = resolve("topk", backend, queries.device)
    if be == "torch":
        return MaskedTopK(*reference.masked_topk(queries, bank, k, exclude_mask, exclude_index))
    if be == "triton":
        _triton_module("topk")
        op = torch.ops.acn_kernels.triton_masked_topk
    else:
        op = torch.ops.acn_kernels.masked_topk
    return MaskedTopK(*op(queries, bank, k, exclude_mask, exclude_index))


__all__ = ["MAX_K", "MaskedTopK", "acn_kl", "masked_topk", "mixture_log_prob"]
