"""The prior network p(z | c-hat) of an ACN: a per-dimension Gaussian mixture from an MLP.

Its log-likelihood and the ACN KL go through the fused ops :func:`~acn_kernels.mixture_log_prob`
and :func:`~acn_kernels.acn_kl` (docs/design.md, "mixture_log_prob and acn_kl").
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..ops import acn_kl, mixture_log_prob


class MixtureParams(NamedTuple):
    """The prior network's output, each [B, D, M]: mixture logits, means, log-scales (log std)."""

    logits: torch.Tensor
    means: torch.Tensor
    log_scales: torch.Tensor


class MixturePrior(nn.Module):
    """p(z | c-hat): a per-dimension mixture of ``components`` Gaussians from an MLP (the paper's).

    Architecture: ``layers`` hidden layers of ``hidden`` tanh units; every hidden layer sees the
    input c-hat (skip connection) and the layer below; the output layer sees every hidden layer.
    It emits, per code dimension d and component m, a logit, a mean and a log-scale.

    Log-scales are bounded to (-``log_scale_bound``, +``log_scale_bound``) (default 4: standard
    deviations in (0.018, 54.6)) by ``bound * tanh(raw / bound)``, which is the identity near 0.
    The fused ops themselves never clamp, so the bound lives here.

    Args:
        code_dim: D. components: M (default 3). hidden: width (512). layers: depth (3).
        log_scale_bound: see above (4.0). backend: for the fused ops (None = automatic).
    """

    def __init__(
        self,
        code_dim: int,
        components: int = 3,
        hidden: int = 512,
        layers: int = 3,
        log_scale_bound: float = 4.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if code_dim < 1 or components < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"code_dim, components, hidden and layers must be >= 1, got "
                             f"{code_dim}, {components}, {hidden}, {layers}")
        if not log_scale_bound > 0:
            raise ValueError(f"log_scale_bound must be > 0, got {log_scale_bound}")
        self.code_dim, self.components = code_dim, components
        self.log_scale_bound = float(log_scale_bound)
        self.backend = backend
        self.hidden = nn.ModuleList(
            nn.Linear(code_dim + (hidden if i else 0), hidden) for i in range(layers)
        )
        self.out = nn.Linear(hidden * layers, code_dim * components * 3)

    def forward(self, c_hat: torch.Tensor) -> MixtureParams:
        """c_hat [B, D] -> :class:`MixtureParams` (each [B, D, M], c_hat's dtype)."""
        if c_hat.dim() != 2 or c_hat.shape[1] != self.code_dim:
            raise ValueError(f"c_hat must have shape [B, code_dim={self.code_dim}], got {tuple(c_hat.shape)}")
        hs, h = [], None
        for layer in self.hidden:
            h = torch.tanh(layer(c_hat if h is None else torch.cat([c_hat, h], -1)))
            hs.append(h)
        out = self.out(torch.cat(hs, -1)).view(-1, self.code_dim, 3, self.components)
        bound = self.log_scale_bound
        return MixtureParams(out[:, :, 0], out[:, :, 1], bound * torch.tanh(out[:, :, 2] / bound))

    def log_prob(self, z: torch.Tensor, c_hat: torch.Tensor) -> torch.Tensor:
        """log p(z | c_hat) [B] (float32) through the fused :func:`~acn_kernels.mixture_log_prob`."""
        return mixture_log_prob(z, *self(c_hat), backend=self.backend)

    def kl(self, z: torch.Tensor, code: torch.Tensor, c_hat: torch.Tensor) -> torch.Tensor:
        """The ACN KL estimate log N(z; code, I) - log p(z | c_hat) [B], fused (:func:`acn_kl`)."""
        return acn_kl(z, code, *self(c_hat), backend=self.backend)

    @torch.no_grad()
    def sample(self, c_hat: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ p(z | c_hat), [B, D]: a component per dimension, then its Gaussian."""
        logits, means, log_scales = self(c_hat)
        probs = torch.softmax(logits.float(), -1).reshape(-1, self.components)
        m = torch.multinomial(probs, 1, generator=generator).view(*logits.shape[:2], 1)
        mu, ls = means.gather(-1, m).squeeze(-1), log_scales.gather(-1, m).squeeze(-1)
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + noise * torch.exp(ls)

    def extra_repr(self) -> str:
        return (f"code_dim={self.code_dim}, components={self.components}, "
                f"log_scale_bound={self.log_scale_bound}, backend={self.backend!r}")


__all__ = ["MixtureParams", "MixturePrior"]
