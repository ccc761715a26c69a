"""Drop-in nn.Modules over the fused ops."""

from __future__ import annotations

import torch
from torch import nn

from .checks import check_float, check_k
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
    """The k nearest rows of a bank [N, D] for each query [B, D] (:func:`masked_topk`).

    The bank is a buffer that *shares* the caller's tensor (``bank.detach()``, no copy): writing
    into the caller's tensor in place (``bank[rows] = codes``) is what the next search sees, and
    ``load_state_dict`` writes into it. :meth:`update` replaces it by another tensor (any N).
    ``.to(device)`` moves it like any buffer (a new tensor on the other device, no longer shared
    with the caller's).

    ``forward(queries, k=None, exclude_mask=None, exclude_index=None)`` returns
    :class:`MaskedTopK`: squared Euclidean dists [B, k] (differentiable in the queries) and
    indices [B, k]; ``k`` defaults to the layer's.
    """

    bank: torch.Tensor

    def __init__(self, bank: torch.Tensor, k: int, backend: str | None = None) -> None:
        super().__init__()
        self.register_buffer("bank", self._checked(bank))
        self.k = check_k(k, bank.shape[0])
        self.backend = backend

    @staticmethod
    def _checked(bank: object) -> torch.Tensor:
        check_float(bank, "bank")
        if bank.dim() != 2:
            raise ValueError(f"bank must be a [N, D] tensor, got shape {tuple(bank.shape)}")
        return bank.detach()

    def update(self, bank: torch.Tensor) -> None:
        """Search ``bank`` [N', D'] from now on (shared, not copied)."""
        self.bank = self._checked(bank)

    def forward(
        self,
        queries: torch.Tensor,
        k: int | None = None,
        exclude_mask: torch.Tensor | None = None,
        exclude_index: torch.Tensor | None = None,
    ) -> MaskedTopK:
        return masked_topk(queries, self.bank, self.k if k is None else k, exclude_mask=exclude_mask,
                           exclude_index=exclude_index, backend=self.backend)

    def extra_repr(self) -> str:
        return f"bank={tuple(self.bank.shape)}, k={self.k}, backend={self.backend!r}"
