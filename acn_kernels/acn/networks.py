"""Encoders and decoders of the ACN and the VAE.

- encoders x [B, C, H, W] -> code [B, D] (the mean of the unit-variance posterior N(code, I)):
  :class:`MLPEncoder` (default), :class:`ConvEncoder`;
- decoders r(x | z): :class:`MLPDecoder` (default), :class:`ConvDecoder`, and the opt-in
  autoregressive :class:`PixelCNNDecoder` (a small gated PixelCNN conditioned on z). A decoder
  holds its pixel likelihood (``likelihood``, :mod:`acn_kernels.acn.likelihood`; default
  :class:`~acn_kernels.acn.likelihood.Bernoulli`, binarised images) and ``forward(z, x)`` returns
  that likelihood's parameters [B, likelihood.param_channels, H, W] (Bernoulli: logits
  [B, C, H, W]); ``autoregressive`` says whether it reads x;
- :func:`bernoulli_nll` (-log r(x | z) of the Bernoulli default, in nats) and
  :func:`decode_sample` (images from z).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .likelihood import Bernoulli, Likelihood

ImageShape = tuple[int, int, int]
MNIST_SHAPE: ImageShape = (1, 28, 28)


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
# Decoders: forward(z, x) -> parameters of ``likelihood``; ``autoregressive`` says whether x is read.


def _likelihood(likelihood: Likelihood | None, image_shape: ImageShape) -> Likelihood:
    """The decoder's likelihood: ``likelihood``, or Bernoulli over the image's channels."""
    if likelihood is None:
        return Bernoulli(image_shape[0])
    if not isinstance(likelihood, Likelihood):
        raise TypeError(f"likelihood must be an acn_kernels.acn.likelihood.Likelihood, got {type(likelihood).__name__}")
    if likelihood.channels != image_shape[0]:
        raise ValueError(f"likelihood is for {likelihood.channels}-channel images but image_shape is "
                         f"{tuple(image_shape)}")
    return likelihood


class MLPDecoder(nn.Module):
    """z [B, D] -> params [B, P, H, W] of ``likelihood`` (P = likelihood.param_channels; default
    Bernoulli logits, P = C): ``hidden`` ReLU layers, linear. Ignores x."""

    autoregressive = False

    def __init__(self, code_dim: int = 16, image_shape: ImageShape = MNIST_SHAPE,
                 hidden: tuple[int, ...] = (512, 512), *, likelihood: Likelihood | None = None) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.likelihood = _likelihood(likelihood, self.image_shape)
        self.out_shape = (self.likelihood.param_channels, *self.image_shape[1:])
        sizes = [code_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], math.prod(self.out_shape)))

    def forward(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(z).view(-1, *self.out_shape)


class ConvDecoder(nn.Module):
    """z [B, D] -> params [B, P, H, W] of ``likelihood`` (H, W divisible by 4): linear, two
    transposed convs. Ignores x."""

    autoregressive = False

    def __init__(self, code_dim: int = 16, image_shape: ImageShape = MNIST_SHAPE, channels: int = 32, *,
                 likelihood: Likelihood | None = None) -> None:
        super().__init__()
        _, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"ConvDecoder needs H and W divisible by 4, got {h}x{w}")
        self.image_shape = tuple(image_shape)
        self.likelihood = _likelihood(likelihood, self.image_shape)
        self.fc = nn.Linear(code_dim, 2 * channels * (h // 4) * (w // 4))
        self.start = (2 * channels, h // 4, w // 4)
        self.net = nn.Sequential(
            nn.ReLU(), nn.ConvTranspose2d(2 * channels, channels, 4, 2, 1),
            nn.ReLU(), nn.ConvTranspose2d(channels, self.likelihood.param_channels, 4, 2, 1),
        )

    def forward(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, *self.start))


class _GatedLayer(nn.Module):
    """One gated PixelCNN layer (van den Oord et al., 2016) with vertical and horizontal stacks.

    Causality comes from one-sided padding, not from masks, so no multiply-add is spent on a
    weight that a mask would zero. The vertical stack at row i sees only rows < i of the image:
    the first layer's (kernel // 2) x kernel convolution reads the rows above i (padded on top,
    the last row dropped); a later layer's (kernel // 2 + 1) x kernel one reads rows i - kernel // 2
    .. i of vertical features that already obey that. The horizontal stack at (i, j) sees row i
    left of j (the first layer reads columns j - kernel // 2 .. j - 1, a later one .. j of
    horizontal features) plus the vertical features of row i (a 1x1 link), so output (i, j)
    depends on pixels before (i, j) in raster order only, without a blind spot. z enters both
    stacks' gates through a per-layer linear map. The ``last`` layer's vertical output would
    feed nothing: it computes only the horizontal stack (and returns None for the vertical).

    The first layer reads the image itself but holds its weights factorised, as a 1x1 embedding
    of the image into ``channels`` features (``embed``) followed by convolutions of those: that
    product is what a PixelCNN with an embedding layer learns, and its gradient steps train the
    first layer as fast as such a network does (a first layer with only C x kernel-area weights
    per output learns markedly slower: measured, docs/acn.md), yet the forward pass folds the
    product into one convolution of the C-channel image, so the wide masked first convolution
    of such a network is never run.
    """

    def __init__(self, in_channels: int, channels: int, kernel: int, code_dim: int, first: bool,
                 last: bool = False) -> None:
        super().__init__()
        half, shift = kernel // 2, int(first)
        self.first, self.last = first, last
        self.embed = nn.Conv2d(in_channels, channels, 1) if first else None
        self.v = nn.Conv2d(channels, 2 * channels, (half + 1 - shift, kernel))
        self.h = nn.Conv2d(channels, 2 * channels, (1, half + 1 - shift))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.cond = nn.Linear(code_dim, (2 if last else 4) * channels)
        # F.pad (left, right, top, bottom); -1 drops the last row / column: the first layer's
        # output at row i (column j) then ends at input row i - 1 (column j - 1).
        self.v_pad = (half, half, half, -shift)
        self.h_pad = (half, -shift, 0, 0)

    def _conv(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """``conv`` of the features of x; in the first layer of x's embedding, folded into one
        convolution of x: weight [O, C, kh, kw] . embed [C, C_in] -> [O, C_in, kh, kw], and the
        embedding's bias summed over the taps into the bias."""
        if self.embed is None:
            return conv(x)
        e = self.embed.weight[:, :, 0, 0]
        weight = torch.einsum("ocij,cn->onij", conv.weight, e)
        bias = conv.bias + torch.einsum("ocij,c->o", conv.weight, self.embed.bias)
        return F.conv2d(x, weight, bias)

    @staticmethod
    def _gate(a: torch.Tensor) -> torch.Tensor:
        t, s = a.chunk(2, 1)
        return torch.tanh(t) * torch.sigmoid(s)

    def forward(
        self, xv: torch.Tensor, xh: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        cond = self.cond(z)[:, :, None, None]
        cv, ch = (None, cond) if self.last else cond.chunk(2, 1)
        v = self._conv(self.v, F.pad(xv, self.v_pad))
        h = self._conv(self.h, F.pad(xh, self.h_pad))
        out_v = None if cv is None else self._gate(v + cv)
        out_h = self.h_out(self._gate(h + self.v_to_h(v) + ch))
        return out_v, (out_h if self.first else out_h + xh)


class PixelCNNDecoder(nn.Module):
    """A small gated PixelCNN r(x | z): autoregressive in raster order.

    ``forward(z, x)`` gives the likelihood's parameters of every pixel at once by teacher forcing
    (x [B, C, H, W] on the likelihood's grid); :meth:`sample` draws pixel by pixel (H * W network
    evaluations). The first layer (7 wide) reads the image itself, 2x - 1, the later ones (3
    wide) ``channels`` features; each layer is conditioned on z through a per-layer linear map
    added inside its gates. The channels of a pixel depend on the pixels before it only, and on
    each other only as far as the likelihood couples them (the logistic mixture does; Bernoulli
    and the categorical treat them as independent: fine for C = 1).

    The state of the decoder before issue 15 (a 1x1 embedding, then masked convolutions; it
    has ``embed.*`` entries) does not load into this one: :meth:`load_state_dict` says so.
    """

    autoregressive = True

    def __init__(self, code_dim: int = 16, image_shape: ImageShape = MNIST_SHAPE, channels: int = 32,
                 layers: int = 5, *, likelihood: Likelihood | None = None) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("layers", layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PixelCNNDecoder {name} must be an integer >= 1, got {value!r}")
        self.image_shape = tuple(image_shape)
        self.likelihood = _likelihood(likelihood, self.image_shape)
        self.layers = nn.ModuleList(
            _GatedLayer(image_shape[0], channels, 7 if i == 0 else 3, code_dim,
                        first=i == 0, last=i == layers - 1)
            for i in range(layers)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                  nn.Conv2d(channels, self.likelihood.param_channels, 1))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if f"{prefix}embed.weight" in state_dict:
            raise RuntimeError(
                f"this is a state of the PixelCNN decoder before issue 15 (a 1x1 embedding and masked "
                f"convolutions: it has {prefix}embed.* entries); the decoder now folds its embedding into "
                "unmasked one-sided convolutions of the image, a different function at the image borders, so "
                "these weights are not loaded: retrain the run (acn-train --decoder pixelcnn ...)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        if x is None:
            raise ValueError("PixelCNNDecoder needs the image x (teacher forcing); use sample() to generate")
        _check_images(x, self.image_shape)
        xv = xh = 2.0 * x - 1.0
        for layer in self.layers:
            xv, xh = layer(xv, xh, z)
        return self.head(xh)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, C, H, W] ~ r(x | z), one pixel at a time."""
        x = z.new_zeros((z.shape[0], *self.image_shape))
        for i in range(self.image_shape[1]):
            for j in range(self.image_shape[2]):
                params = self(z, x)[:, :, i : i + 1, j : j + 1]
                x[:, :, i, j] = self.likelihood.sample(params, generator)[:, :, 0, 0].to(x.dtype)
        return x


DECODERS = {"mlp": MLPDecoder, "conv": ConvDecoder, "pixelcnn": PixelCNNDecoder}
ENCODERS = {"mlp": MLPEncoder, "conv": ConvEncoder}


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log r(x | z) [B] in nats: Bernoulli cross-entropy summed over pixels (float32 for float32
    and half logits), :meth:`Bernoulli.nll <acn_kernels.acn.likelihood.Bernoulli.nll>`."""
    return Bernoulli(logits.shape[1]).nll(logits, x)


def decode_sample(decoder: nn.Module, z: torch.Tensor, generator: torch.Generator | None = None,
                  mean: bool = False) -> torch.Tensor:
    """Images [B, C, H, W] from z: the expected image if ``mean`` (non-autoregressive decoders
    only; for Bernoulli the pixel probabilities), else samples of the decoder's likelihood
    (pixel by pixel for an autoregressive decoder)."""
    if decoder.autoregressive:
        return decoder.sample(z, generator)
    params = decoder(z)
    return decoder.likelihood.mean(params) if mean else decoder.likelihood.sample(params, generator)


__all__ = ["DECODERS", "ENCODERS", "MNIST_SHAPE", "ConvDecoder", "ConvEncoder", "ImageShape", "MLPDecoder",
           "MLPEncoder", "PixelCNNDecoder", "bernoulli_nll", "decode_sample"]
