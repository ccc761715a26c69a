"""The ACN model from swappable parts, and the VAE baseline.

Parts (all ``nn.Module``):

- encoders x [B, C, H, W] -> code [B, D] (the mean of the unit-variance posterior N(code, I)):
  :class:`MLPEncoder` (default), :class:`ConvEncoder`;
- decoders r(x | z) over binarised images, ``forward(z, x) -> logits [B, C, H, W]`` (Bernoulli):
  :class:`MLPDecoder` (default), :class:`ConvDecoder`, and the opt-in autoregressive
  :class:`PixelCNNDecoder` (a small gated PixelCNN conditioned on z);
- :class:`MixturePrior`, the prior network p(z | c-hat);
- :class:`ACN` (encoder, decoder, prior, :class:`~acn_kernels.CodeBank`) and :class:`VAE`
  (encoder, decoder, N(0, I) prior).

Losses are per example, in nats: KL (coding cost of z) + reconstruction NLL -log r(x | z).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import acn_kl, mixture_log_prob
from . import rng
from .bank import CodeBank

ImageShape = tuple[int, int, int]
MNIST_SHAPE: ImageShape = (1, 28, 28)


class MixtureParams(NamedTuple):
    """The prior network's output, each [B, D, M]: mixture logits, means, log-scales (log std)."""

    logits: torch.Tensor
    means: torch.Tensor
    log_scales: torch.Tensor


class LossTerms(NamedTuple):
    """Per-example loss terms [B] in nats (loss = kl + recon), plus the codes [B, D] and, for an
    ACN, the neighbour rows [B] (None for the VAE)."""

    loss: torch.Tensor
    kl: torch.Tensor
    recon: torch.Tensor
    code: torch.Tensor
    rows: torch.Tensor | None


# ------------------------------------------------------------------------------------------------
# Prior


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


# ------------------------------------------------------------------------------------------------
# Encoders


def _check_images(x: torch.Tensor, shape: ImageShape) -> None:
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"x must have shape [B, {', '.join(map(str, shape))}], got {tuple(x.shape)}")


class MLPEncoder(nn.Module):
    """x [B, C, H, W] -> code [B, D]: flatten, ``hidden`` ReLU layers, linear."""

    def __init__(self, code_dim: int = 16, image_shape: ImageShape = MNIST_SHAPE,
                 hidden: tuple[int, ...] = (512, 512)) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        sizes = [math.prod(image_shape), *hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(nn.Flatten(), *layers, nn.Linear(sizes[-1], code_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.image_shape)
        return self.net(x)


class ConvEncoder(nn.Module):
    """x [B, C, H, W] (H, W divisible by 4) -> code [B, D]: two stride-2 4x4 convolutions, linear."""

    def __init__(self, code_dim: int = 16, image_shape: ImageShape = MNIST_SHAPE, channels: int = 32) -> None:
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"ConvEncoder needs H and W divisible by 4, got {h}x{w}")
        self.image_shape = tuple(image_shape)
        self.net = nn.Sequential(
            nn.Conv2d(c, channels, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 4, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * channels * (h // 4) * (w // 4), code_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.image_shape)
        return self.net(x)


# ------------------------------------------------------------------------------------------------
# Decoders: forward(z, x) -> Bernoulli logits of x; ``autoregressive`` says whether x is read.


class MLPDecoder(nn.Module):
    """z [B, D] -> logits [B, C, H, W]: ``hidden`` ReLU layers, linear. Ignores x."""

    autoregressive = False

    def __init__(self, code_dim: int = 16, image_shape: ImageShape = MNIST_SHAPE,
                 hidden: tuple[int, ...] = (512, 512)) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        sizes = [code_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], math.prod(image_shape)))

    def forward(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(z).view(-1, *self.image_shape)


class ConvDecoder(nn.Module):
    """z [B, D] -> logits [B, C, H, W] (H, W divisible by 4): linear, two transposed convs. Ignores x."""

    autoregressive = False

    def __init__(self, code_dim: int = 16, image_shape: ImageShape = MNIST_SHAPE, channels: int = 32) -> None:
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"ConvDecoder needs H and W divisible by 4, got {h}x{w}")
        self.image_shape = tuple(image_shape)
        self.fc = nn.Linear(code_dim, 2 * channels * (h // 4) * (w // 4))
        self.start = (2 * channels, h // 4, w // 4)
        self.net = nn.Sequential(
            nn.ReLU(), nn.ConvTranspose2d(2 * channels, channels, 4, 2, 1),
            nn.ReLU(), nn.ConvTranspose2d(channels, c, 4, 2, 1),
        )

    def forward(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, *self.start))


class _GatedLayer(nn.Module):
    """One gated PixelCNN layer (van den Oord et al., 2016) with vertical and horizontal stacks.

    The vertical stack at row i sees only rows < i of the image (the first layer masks its own
    row; later ones read vertical features that already obey that); the horizontal stack at (i, j)
    sees row i left of j (the first layer masks column j) plus the vertical features of row i.
    So output (i, j) depends on pixels before (i, j) in raster order only, without a blind spot.
    """

    def __init__(self, channels: int, kernel: int, code_dim: int, first: bool) -> None:
        super().__init__()
        half = kernel // 2
        self.first = first
        self.v = nn.Conv2d(channels, 2 * channels, (half + 1, kernel), padding=(half, half))
        self.h = nn.Conv2d(channels, 2 * channels, (1, half + 1), padding=(0, half))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.cond = nn.Linear(code_dim, 4 * channels)
        v_mask, h_mask = torch.ones_like(self.v.weight), torch.ones_like(self.h.weight)
        if first:  # the first layer must not see the pixel itself: drop its own row / column
            v_mask[:, :, -1] = 0
            h_mask[:, :, :, -1] = 0
        self.register_buffer("v_mask", v_mask, persistent=False)
        self.register_buffer("h_mask", h_mask, persistent=False)

    @staticmethod
    def _gate(a: torch.Tensor) -> torch.Tensor:
        t, s = a.chunk(2, 1)
        return torch.tanh(t) * torch.sigmoid(s)

    def forward(
        self, xv: torch.Tensor, xh: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hgt, wid = xv.shape[-2:]
        cv, ch = self.cond(z)[:, :, None, None].chunk(2, 1)
        v = F.conv2d(xv, self.v.weight * self.v_mask, self.v.bias, padding=self.v.padding)[:, :, :hgt]
        h = F.conv2d(xh, self.h.weight * self.h_mask, self.h.bias, padding=self.h.padding)[:, :, :, :wid]
        out_v = self._gate(v + cv)
        out_h = self.h_out(self._gate(h + self.v_to_h(v) + ch))
        return out_v, (out_h if self.first else out_h + xh)


class PixelCNNDecoder(nn.Module):
    """A small gated PixelCNN r(x | z) over binary images: autoregressive in raster order.

    ``forward(z, x)`` gives all logits at once by teacher forcing (x [B, C, H, W] in {0, 1});
    :meth:`sample` draws pixel by pixel (H * W network evaluations). Each layer is conditioned on
    z through a per-layer linear map added inside its gates. Channels of a pixel are modelled
    independently given the pixels before it (fine for C = 1, binarised MNIST).
    """

    autoregressive = True

    def __init__(self, code_dim: int = 16, image_shape: ImageShape = MNIST_SHAPE, channels: int = 32,
                 layers: int = 5) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.embed = nn.Conv2d(image_shape[0], channels, 1)
        self.layers = nn.ModuleList(
            _GatedLayer(channels, 7 if i == 0 else 3, code_dim, first=i == 0) for i in range(layers)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                  nn.Conv2d(channels, image_shape[0], 1))

    def forward(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        if x is None:
            raise ValueError("PixelCNNDecoder needs the image x (teacher forcing); use sample() to generate")
        _check_images(x, self.image_shape)
        xv = xh = self.embed(2.0 * x - 1.0)
        for layer in self.layers:
            xv, xh = layer(xv, xh, z)
        return self.head(xh)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Binary images [B, C, H, W] ~ r(x | z), one pixel at a time."""
        x = z.new_zeros((z.shape[0], *self.image_shape))
        for i in range(self.image_shape[1]):
            for j in range(self.image_shape[2]):
                p = torch.sigmoid(self(z, x)[:, :, i, j])
                x[:, :, i, j] = torch.bernoulli(p, generator=generator)
        return x


DECODERS = {"mlp": MLPDecoder, "conv": ConvDecoder, "pixelcnn": PixelCNNDecoder}
ENCODERS = {"mlp": MLPEncoder, "conv": ConvEncoder}


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log r(x | z) [B] in nats: Bernoulli cross-entropy summed over pixels (float32)."""
    return F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none").flatten(1).sum(1)


def decode_sample(decoder: nn.Module, z: torch.Tensor, generator: torch.Generator | None = None,
                  mean: bool = False) -> torch.Tensor:
    """Images [B, C, H, W] from z: pixel probabilities if ``mean`` (non-autoregressive decoders
    only), else binary samples (pixel by pixel for an autoregressive decoder)."""
    if decoder.autoregressive:
        return decoder.sample(z, generator)
    p = torch.sigmoid(decoder(z))
    return p if mean else torch.bernoulli(p, generator=generator)


# ------------------------------------------------------------------------------------------------
# Models


class ACN(nn.Module):
    """An Associative Compression Network: encoder, decoder, prior network and code bank.

    ``forward(x, index)`` runs DESIGN.md's batch for images x [B, C, H, W] of training examples
    ``index`` [B] (int64 rows of the bank): code = encoder(x); the bank writes the codes and picks
    one neighbour c-hat per example (:meth:`CodeBank.neighbours`); z = code + eps with eps the
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
        recon = bernoulli_nll(self.decoder(z, x), x)
        return LossTerms(kl + recon, kl, recon, code, rows)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> LossTerms:
        code = self.encoder(x)
        nb = self.bank.neighbours(index, code)
        eps = rng.normal(self.bank.seed, rng.EPS, self.bank.pass_index, index, code.shape[1], code.dtype)
        return self.terms(x, code, nb.codes.to(code.dtype), eps, nb.rows)

    @torch.no_grad()
    def daydream(self, x: torch.Tensor, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Daydream chains [steps + 1, B, C, H, W]: x -> code -> z ~ p(z | code) -> x' ~ r(x | z) -> ...

        Entry 0 is x. Each later entry is the decoder's pixel probabilities (binary samples for an
        autoregressive decoder); the chain continues from a binary sample of them.
        """
        out, cur = [x], x
        for _ in range(steps):
            z = self.prior.sample(self.encoder(cur), generator)
            if self.decoder.autoregressive:
                cur = shown = self.decoder.sample(z, generator)
            else:
                shown = torch.sigmoid(self.decoder(z))
                cur = torch.bernoulli(shown, generator=generator)
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
        recon = bernoulli_nll(self.decoder(code + eps, x), x)
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
) -> ACN | VAE:
    """An :class:`ACN` (or ``kind="vae"``: a :class:`VAE`) from part names.

    encoder: "mlp" | "conv"; decoder: "mlp" | "conv" | "pixelcnn". num_codes is the number of
    training examples (the bank's rows). Weights are initialised from torch's global RNG, so seed
    it first (the training command does).
    """
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {encoder!r}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {sorted(DECODERS)}, got {decoder!r}")
    enc = ENCODERS[encoder](code_dim, image_shape)
    dec = DECODERS[decoder](code_dim, image_shape)
    if kind == "acn":
        return ACN(enc, dec, MixturePrior(code_dim, components), CodeBank(num_codes, code_dim, k, seed))
    if kind == "vae":
        return VAE(enc, dec, seed)
    raise ValueError(f"kind must be 'acn' or 'vae', got {kind!r}")


__all__ = ["ACN", "DECODERS", "ENCODERS", "VAE", "ConvDecoder", "ConvEncoder", "LossTerms", "MLPDecoder",
           "MLPEncoder", "MixtureParams", "MixturePrior", "PixelCNNDecoder", "bernoulli_nll", "build_model",
           "decode_sample"]
