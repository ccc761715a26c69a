"""Fake kernels and autograd formulas of the registered ops, shared by every compiled backend.

The C++ ops (schemas in csrc/ops.cpp: ``acn_kernels::mixture_fwd`` / ``mixture_bwd`` /
``masked_topk`` / ``resolve_neighbours``) are registered here when the extension loads; each
Triton module registers its own ``acn_kernels::triton_*`` custom ops with the same two
functions, so every backend's op has the same fake kernel (for torch.compile and opcheck) and the
same backward.
"""

from __future__ import annotations

import torch

from . import _ext, reference
from .checks import FALLBACK, MAX_K, NEEDS_SEARCH, RESOLVED


def register_mixture(fwd_name: str, bwd_name: str) -> None:
    """Fake kernels and autograd for a (mixture_fwd, mixture_bwd) pair with the csrc/ops.cpp schema."""
    bwd = getattr(torch.ops.acn_kernels, bwd_name.split("::")[-1])

    @torch.library.register_fake(fwd_name)
    def _fwd_fake(z, logits, means, log_scales, code, per_dim, posterior_log_scale=None):
        torch._check(logits.shape[:2] == z.shape)
        acc = reference.acc_dtype(z.dtype)
        out = z.new_empty(z.shape, dtype=acc) if per_dim else z.new_empty(z.shape[:1], dtype=acc)
        return out, z.new_empty((*z.shape, 2), dtype=acc)

    @torch.library.register_fake(bwd_name)
    def _bwd_fake(grad_out, z, logits, means, log_scales, code, lse, per_dim, posterior_log_scale=None):
        def optional(t):
            return torch.empty_like(z) if t is not None else z.new_empty((0,))

        return (torch.empty_like(z), torch.empty_like(logits), torch.empty_like(means),
                torch.empty_like(log_scales), optional(code), optional(posterior_log_scale))

    def setup_context(ctx, inputs, output):
        # Defaults filled in: the posterior log-scale is there (None) even where a call left it out.
        z, logits, means, log_scales, code, per_dim, pls = inputs
        ctx.save_for_backward(z, logits, means, log_scales, code, pls, output[1])
        ctx.per_dim = per_dim
        ctx.has_code = code is not None
        ctx.has_scale = pls is not None
        ctx.set_materialize_grads(False)  # lse has no gradient: no [B, D, 2] of zeros per call

    def backward(ctx, grad_out, _grad_lse):
        if grad_out is None:  # only lse was used; it is not differentiated
            return (None,) * 7
        z, logits, means, log_scales, code, pls, lse = ctx.saved_tensors
        dz, dl, dm, ds, dc, dq = bwd(grad_out.contiguous(), z, logits, means, log_scales,
                                     code if ctx.has_code else None, lse, ctx.per_dim,
                                     pls if ctx.has_scale else None)
        # Seven, also for a call that left out the log-scale: autograd drops trailing Nones.
        return dz, dl, dm, ds, (dc if ctx.has_code else None), None, (dq if ctx.has_scale else None)

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


def masked_topk_backward(
    grad: torch.Tensor, queries: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of dists = ||q_b - bank_i||^2 with respect to queries and bank (zero at padding).

    Plain torch ops (a gather and an index_add), deterministic on CPU.
    """
    acc = reference.acc_dtype(queries.dtype)
    valid = indices >= 0
    rows = indices.clamp_min(0)
    sel = bank.to(acc)[rows]  # [B, k, D]
    g = torch.where(valid, grad.to(acc), 0.0).unsqueeze(-1)
    diff = torch.where(valid.unsqueeze(-1), queries.to(acc).unsqueeze(1) - sel, 0.0) * (2.0 * g)
    gq = diff.sum(1)
    gb = torch.zeros(bank.shape, dtype=acc, device=bank.device)
    gb.index_add_(0, rows.reshape(-1), -diff.reshape(-1, bank.shape[1]))
    return gq.to(queries.dtype), gb.to(bank.dtype)


def register_masked_topk(name: str) -> None:
    """Fake kernel and autograd for a masked_topk op with the csrc/ops.cpp schema."""

    @torch.library.register_fake(name)
    def _fake(queries, bank, k, exclude_mask, exclude_index):
        shape = (queries.shape[0], k)
        return (queries.new_empty(shape, dtype=reference.acc_dtype(queries.dtype)),
                queries.new_empty(shape, dtype=torch.int64))

    def setup_context(ctx, inputs, output):
        queries, bank = inputs[0], inputs[1]
        ctx.save_for_backward(queries, bank, output[1])

    def backward(ctx, grad_dists, _grad_idx):
        queries, bank, indices = ctx.saved_tensors
        gq, gb = masked_topk_backward(grad_dists, queries, bank, indices)
        return gq, gb, None, None, None

    torch.library.register_autograd(name, backward, setup_context=setup_context)


def register_resolve_neighbours(name: str) -> None:
    """Fake kernel of a resolve_neighbours op with the csrc/ops.cpp schema (integer outputs: no
    autograd)."""

    @torch.library.register_fake(name)
    def _fake(candidates, index, uniforms, k, fallback):
        return tuple(candidates.new_empty(candidates.shape[:1]) for _ in range(3))


if _ext.C is not None:
    assert int(_ext.C.MAX_K) == MAX_K, "csrc/utils.h kMaxK and acn_kernels.MAX_K disagree"
    assert tuple(_ext.C.RESOLVE_STATUS) == (RESOLVED, NEEDS_SEARCH, FALLBACK), \
        "csrc/include/resolve_neighbours.h status codes and acn_kernels.checks disagree"
    register_mixture("acn_kernels::mixture_fwd", "acn_kernels::mixture_bwd")
    register_masked_topk("acn_kernels::masked_topk")
    register_resolve_neighbours("acn_kernels::resolve_neighbours")
