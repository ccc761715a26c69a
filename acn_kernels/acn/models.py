"""The ACN model from swappable parts, and the VAE baseline.

- :class:`ACN`: encoder, decoder (:mod:`acn_kernels.acn.networks`), prior network
  (:class:`~acn_kernels.acn.prior.MixturePrior`) and code bank (:class:`~acn_kernels.CodeBank`);
- :class:`VAE`: the same encoder and decoder with an N(0, I) prior;
- :func:`build_model`: either, from part names.

Losses are per example, in nats: KL (coding cost of z) + reconstruction NLL -log r(x | z).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import rng
from .bank import CodeBank
from .likelihood import LIKELIHOODS, make_likelihood
from .networks import DECODERS, ENCODERS, MNIST_SHAPE, ImageShape
from .prior import MixturePrior


class LossTerms(NamedTuple):
    """Per-example loss terms [B] in nats (loss = kl + recon), plus the codes [B, D] and, for an
    ACN, the neighbours' bank rows ``indices`` [B] int64 (None for the VAE)."""

    loss: torch.Tensor
    kl: torch.Tensor
    recon: torch.Tensor
    code: torch.Tensor
    indices: torch.Tensor | None

    @property
    def rows(self) -> torch.Tensor | None:
        """:attr:`indices` under its former name (kept for code written against it)."""
        return self.indices


class ACN(nn.Module):
    """An Associative Compression Network: encoder, decoder, prior network and code bank.

    ``forward(x, index)`` runs the batch of docs/design.md ("The model") for images x [B, C, H, W]
    of training examples ``index`` [B] (int64 rows of the bank): code = encoder(x); the bank writes
    the codes and picks one neighbour c-hat per example (:meth:`CodeBank.neighbours`); z = code + eps with eps the
    counter-based N(0, I) draw of (bank.seed, pass, index); KL = log N(z; code, I) -
    log p(z | c-hat) (fused :func:`~acn_kernels.acn_kl`); recon = -log r(x | z). Returns
    :class:`LossTerms`; the batch loss is ``terms.loss.mean()``.

    The KL is a one-sample estimate, and within a pass the neighbour map is a permutation without
    fixed points, so the total approximates (and does not equal) a sequential code length.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: MixturePrior, bank: CodeBank) -> None:
        super().__init__()
        if prior.code_dim != bank.code_dim:
            raise ValueError(f"prior has code_dim={prior.code_dim} but bank has code_dim={bank.code_dim}")
        self.encoder, self.decoder, self.prior, self.bank = encoder, decoder, prior, bank

    @property
    def pass_index(self) -> int:
        return self.bank.pass_index

    def new_pass(self) -> None:
        """Start the next pass through the training data (clears the bank's used mask)."""
        self.bank.new_pass()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> codes [B, D]."""
        return self.encoder(x)

    def terms(self, x: torch.Tensor, code: torch.Tensor, c_hat: torch.Tensor, eps: torch.Tensor,
              rows: torch.Tensor | None = None) -> LossTerms:
        """Loss terms given the code, the neighbour code and the noise (shared by training and
        held-out evaluation)."""
        z = code + eps
        kl = self.prior.kl(z, code, c_hat)
        recon = self.decoder.likelihood.nll(self.decoder(z, x), x)
        return LossTerms(kl + recon, kl, recon, code, rows)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> LossTerms:
        code = self.encoder(x)
        nb = self.bank.neighbours(index, code)
        eps = rng.normal(self.bank.seed, rng.EPS, self.bank.pass_index, index, code.shape[1], code.dtype)
        return self.terms(x, code, nb.codes.to(code.dtype), eps, nb.indices)

    @torch.no_grad()
    def daydream(self, x: torch.Tensor, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Daydream chains [steps + 1, B, C, H, W]: x -> code -> z ~ p(z | code) -> x' ~ r(x | z) -> ...

        Entry 0 is x. Each later entry is the decoder's expected image (for Bernoulli the pixel
        probabilities; samples for an autoregressive decoder); the chain continues from a sample
        of the decoder's likelihood.
        """
        out, cur = [x], x
        likelihood = self.decoder.likelihood
        for _ in range(steps):
            z = self.prior.sample(self.encoder(cur), generator)
            if self.decoder.autoregressive:
                cur = shown = self.decoder.sample(z, generator)
            else:
                params = self.decoder(z)
                shown = likelihood.mean(params)
                cur = likelihood.sample(params, generator)
            out.append(shown)
        return torch.stack(out)


class VAE(nn.Module):
    """The baseline: the same encoder and decoder, posterior N(code, I), prior N(0, I).

    KL(N(code, I) || N(0, I)) = 0.5 * ||code||^2 is used in closed form. eps is the counter-based
    draw of (seed, pass, index), as for the ACN. ``forward(x, index)`` returns :class:`LossTerms`.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, seed: int = 0) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.seed = int(seed)
        self.pass_index = 0

    def get_extra_state(self) -> dict[str, int]:
        return {"pass_index": self.pass_index, "seed": self.seed}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.pass_index, self.seed = int(state["pass_index"]), int(state["seed"])

    def new_pass(self) -> None:
        self.pass_index += 1

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def terms(self, x: torch.Tensor, code: torch.Tensor, eps: torch.Tensor) -> LossTerms:
        kl = 0.5 * code.float().square().sum(1)
        recon = self.decoder.likelihood.nll(self.decoder(code + eps, x), x)
        return LossTerms(kl + recon, kl, recon, code, None)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> LossTerms:
        code = self.encoder(x)
        eps = rng.normal(self.seed, rng.EPS, self.pass_index, index, code.shape[1], code.dtype)
        return self.terms(x, code, eps)


def build_model(
    kind: str = "acn",
    *,
    num_codes: int,
    image_shape: ImageShape = MNIST_SHAPE,
    encoder: str = "mlp",
    decoder: str = "mlp",
    code_dim: int = 16,
    k: int = 5,
    components: int = 3,
    seed: int = 0,
    likelihood: str = "bernoulli",
    logistic_components: int = 5,
) -> ACN | VAE:
    """An :class:`ACN` (or ``kind="vae"``: a :class:`VAE`) from part names.

    encoder: "mlp" | "conv"; decoder: "mlp" | "conv" | "pixelcnn"; likelihood: the decoder's
    "bernoulli" (binarised images) | "logistic" (8-bit, a mixture of ``logistic_components``
    discretised logistics) | "categorical" (8-bit, 256-way), see
    :mod:`acn_kernels.acn.likelihood`. num_codes is the number of training examples (the bank's
    rows). Weights are initialised from torch's global RNG, so seed it first (the training
    command does).
    """
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {encoder!r}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {sorted(DECODERS)}, got {decoder!r}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {sorted(LIKELIHOODS)}, got {likelihood!r}")
    options = {"components": logistic_components} if likelihood == "logistic" else {}
    enc = ENCODERS[encoder](code_dim, image_shape)
    dec = DECODERS[decoder](code_dim, image_shape, likelihood=make_likelihood(likelihood, image_shape[0], **options))
    if kind == "acn":
        return ACN(enc, dec, MixturePrior(code_dim, components), CodeBank(num_codes, code_dim, k, seed))
    if kind == "vae":
        return VAE(enc, dec, seed)
    raise ValueError(f"kind must be 'acn' or 'vae', got {kind!r}")


__all__ = ["ACN", "VAE", "LossTerms", "build_model"]
