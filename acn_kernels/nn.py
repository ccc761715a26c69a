"""Drop-in nn.Modules over the fused ops."""

from __future__ import annotations

import torch
from torch import nn

from .ops import MaskedTopK, masked_topk, mixture_log_prob


class MixtureNLLLoss(nn.Module):
    """Negative log-likelihood of z under a per-dimension Gaussian mixture, in nats.

    forward(z [B, D], logits, means, log_scales [B, D, M]) -> scalar ("mean" over rows, default),
    "sum", or [B] with reduction="none". float32 for float32/16/bf16 inputs.
    """

    def __init__(self, reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction
        self.backend = backend

    def forward(
        self, z: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
    ) -> torch.Tensor:
        nll = -mixture_log_prob(z, logits, means, log_scales, backend=self.backend)
        if self.reduction == "mean":
            return nll.mean()
        if self.reduction == "sum":
            return nll.sum()
        return nll

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"


class KNNLayer(nn.Module):
    """k nearest rows of a bank buffer [N, D] for each query [B, D].

    The bank is a buffer (saved in state_dict, moved by .to()); ``forward(queries, exclude_mask=None,
    exclude_index=None)`` returns :class:`MaskedTopK` with dists differentiable in the queries.
    """

    def __init__(self, bank: torch.Tensor, k: int, backend: str | None = None) -> None:
        super().__init__()
        if not isinstance(bank, torch.Tensor) or bank.dim() != 2:
            raise ValueError(f"bank must be a [N, D] tensor, got {getattr(bank, 'shape', bank)}")
        self.register_buffer("bank", bank.detach().clone())
        self.k = k
        self.backend = backend

    def forward(
        self,
        queries: torch.Tensor,
        exclude_mask: torch.Tensor | None = None,
        exclude_index: torch.Tensor | None = None,
    ) -> MaskedTopK:
        return masked_topk(queries, self.bank, self.k, exclude_mask=exclude_mask,
                           exclude_index=exclude_index, backend=self.backend)

    def extra_repr(self) -> str:
        return f"bank={tuple(self.bank.shape)}, k={self.k}, backend={self.backend!r}"
