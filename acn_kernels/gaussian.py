"""Single-Gaussian priors: the closed-form KL and the M = 1 mixture (docs/design.md,
"mixture_log_prob and acn_kl").

Many VAE and ACN codebases use one diagonal Gaussian per code dimension as the prior.
:func:`as_mixture` turns its mean and log-scale into the [B, D, 1] mixture parameters the fused
ops take; :func:`gaussian_kl` is the exact KL for that case, an explicit alternative to the
one-sample estimate of :func:`~acn_kernels.acn_kl`. Both are plain differentiable PyTorch: the
closed form is a few elementwise operations, with nothing for a fused kernel to save.
"""

from __future__ import annotations

import torch

from .checks import check_gaussian_kl, check_one_gaussian
from .reference import acc_dtype

# Below this |x|, expm1(x) - x is summed as its Taylor series up to x^20 / 20! (the next term is
# below float64's epsilon relative to the sum at |x| = 1); at |x| >= 1 the direct form loses at
# most 1.3 bits (expm1(1) / (expm1(1) - 1) = 2.4).
_SERIES_BOUND = 1.0
_SERIES_TERMS = 20


def _expm1_minus_x(x: torch.Tensor) -> torch.Tensor:
    """exp(x) - 1 - x without the cancellation of the direct form near 0 (where it is ~x^2 / 2)."""
    small = x.abs() < _SERIES_BOUND
    # The series sees 0 where it is not used, so its (discarded) branch cannot overflow and turn
    # the zero gradient torch.where gives it into NaN.
    xs = torch.where(small, x, torch.zeros_like(x))
    acc = torch.ones_like(xs)
    for n in range(_SERIES_TERMS, 2, -1):  # Horner: x^2/2 (1 + x/3 (1 + x/4 (...)))
        acc = 1 + xs / n * acc
    series = 0.5 * xs * xs * acc
    return torch.where(small, series, torch.expm1(x) - x)


def as_mixture(mean: torch.Tensor, log_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Gaussian per dimension as a one-component mixture for the fused ops.

    Args:
        mean, log_scale: [B, D], one floating dtype and device (log_scale = log sigma).

    Returns:
        (logits, means, log_scales), each [B, D, 1]: zero logits (weight 1) and views of the
        inputs, so ``acn_kl(z, code, *as_mixture(mean, log_scale))`` is the one-sample KL
        estimate under N(mean, diag(exp(2 log_scale))), differentiable in mean and log_scale.
    """
    check_one_gaussian(mean, log_scale)
    return mean.new_zeros((*mean.shape, 1)), mean.unsqueeze(-1), log_scale.unsqueeze(-1)


def gaussian_kl(
    code: torch.Tensor,
    prior_mean: torch.Tensor,
    prior_log_scale: torch.Tensor,
    *,
    posterior_log_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The exact KL(q || p) [B] in nats between diagonal Gaussians, summed over D.

    q = N(code, diag(exp(2 posterior_log_scale))) (N(code, I) when ``posterior_log_scale`` is
    None, the ACN default), p = N(prior_mean, diag(exp(2 prior_log_scale))). Per dimension,
    with t = log s_q - log s_p and u = (code - mean_p) / s_p:
    KL_d = (exp(2t) - 1 - 2t) / 2 + u^2 / 2, a sum of two non-negative terms, the first
    evaluated without cancellation near t = 0.

    The analytic counterpart of :func:`~acn_kernels.acn_kl` for a single-Gaussian prior (a
    mixture with M = 1): its expectation over z ~ q, without the one-sample estimate's noise,
    and meaningful where that estimate is not (at z = code, e.g. in evaluation).

    Args:
        code: [B, D] the posterior mean.
        prior_mean, prior_log_scale: [B, D], or [B, D, 1] (an M = 1 mixture's parameters).
        posterior_log_scale: optional [B, D], log sigma of q.

    All tensors share one floating dtype and device. Returns float32 (float64 for float64
    inputs), differentiable in every input. Overflows to +inf only where the value does.
    """
    check_gaussian_kl(code, prior_mean, prior_log_scale, posterior_log_scale)
    dt = acc_dtype(code.dtype)
    if prior_mean.dim() == 3:
        prior_mean, prior_log_scale = prior_mean.squeeze(-1), prior_log_scale.squeeze(-1)
    lp = prior_log_scale.to(dt)
    t = -lp if posterior_log_scale is None else posterior_log_scale.to(dt) - lp
    u = (code.to(dt) - prior_mean.to(dt)) * torch.exp(-lp)
    return (0.5 * _expm1_minus_x(2 * t) + 0.5 * u * u).sum(-1)


__all__ = ["as_mixture", "gaussian_kl"]
