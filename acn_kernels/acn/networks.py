"""Encoders and decoders of the ACN and the VAE, and the Bernoulli likelihood of binarised images.

- encoders x [B, C, H, W] -> code [B, D] (the mean of the unit-variance posterior N(code, I)):
  :class:`MLPEncoder` (default), :class:`ConvEncoder`;
- decoders r(x | z) over binarised images, ``forward(z, x) -> logits [B, C, H, W]`` (Bernoulli):
  :class:`MLPDecoder` (default), :class:`ConvDecoder`, and the opt-in autoregressive
  :class:`PixelCNNDecoder` (a small gated PixelCNN conditioned on z);
- :func:`bernoulli_nll` (-log r(x | z) in nats) and :func:`decode_sample` (images from z).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

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


__all__ = ["DECODERS", "ENCODERS", "MNIST_SHAPE", "ConvDecoder", "ConvEncoder", "ImageShape", "MLPDecoder",
           "MLPEncoder", "PixelCNNDecoder", "bernoulli_nll", "decode_sample"]
