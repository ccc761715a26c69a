"""Pixel likelihoods r(x | z) for the decoders: what a decoder's output means.

A decoder emits ``params`` [B, P, H, W]; a likelihood for images of C channels says how many
output channels it needs per pixel (``param_channels`` = P) and turns ``params`` into

- ``nll(params, x)``: -log r(x | z) per image [B], in nats (float32; float64 for float64 params);
- ``sample(params, generator)``: images [B, C, H, W] drawn from r(x | z);
- ``mean(params)``: the expected image [B, C, H, W] (for pictures).

Images are float tensors [B, C, H, W] in [0, 1] on a grid of ``levels`` values k / (levels - 1),
the data layer's :attr:`~acn_kernels.acn.data.ImageData.levels`:

- :class:`Bernoulli` (``"bernoulli"``, levels 2, the default): binarised images, P = C logits.
- :class:`DiscretizedLogisticMixture` (``"logistic"``, levels 256): the PixelCNN++ likelihood
  (Salimans et al., 2017) of 8-bit images, a mixture of M logistics per pixel discretised to
  256 bins, the edge bins extended to infinity, the channels of a pixel coupled linearly.
- :class:`Categorical` (``"categorical"``, levels 256): a 256-way softmax per channel and pixel.

:func:`bits_per_dim` converts nats per image to bits per dimension (per channel and pixel).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

LEVELS = 256
"""Levels of an 8-bit pixel channel: values k / 255, k = 0..255."""


def bits_per_dim(nats: torch.Tensor | float, image_shape: tuple[int, ...]) -> torch.Tensor | float:
    """Nats per image -> bits per dimension: nats / (C * H * W * ln 2), for ``image_shape`` (C, H, W).

    For discrete pixels (binarised or 8-bit) this is the code length per channel and pixel; an
    8-bit image coded uniformly costs exactly 8 bits per dimension.
    """
    return nats / (math.prod(image_shape) * math.log(2.0))


def _compute_dtype(params: torch.Tensor) -> torch.dtype:
    """float32 for float32 and half params, float64 for float64 params."""
    return torch.promote_types(params.dtype, torch.float32)


class Likelihood(ABC):
    """r(x | z) over images of ``channels`` channels, parametrised by ``param_channels`` decoder
    output channels per pixel. Subclasses set ``name``, ``levels`` and ``param_channels``."""

    name: str
    levels: int
    param_channels: int

    def __init__(self, channels: int) -> None:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be an integer >= 1, got {channels!r}")
        self.channels = channels

    def _check(self, params: torch.Tensor, x: torch.Tensor | None = None) -> None:
        if not isinstance(params, torch.Tensor) or not params.is_floating_point():
            raise TypeError(f"params must be a floating tensor, got {getattr(params, 'dtype', type(params))}")
        if params.dim() != 4 or params.shape[1] != self.param_channels:
            raise ValueError(f"params must have shape [B, {self.param_channels}, H, W] for {self!r}, got "
                             f"{tuple(params.shape)}")
        if x is None:
            return
        want = (params.shape[0], self.channels, *params.shape[2:])
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != want:
            raise ValueError(f"x must have shape {list(want)} to match params {tuple(params.shape)}, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")

    def _level_index(self, x: torch.Tensor) -> torch.Tensor:
        """x in [0, 1] on the grid k / (levels - 1) -> k (int64). Values more than a quarter of a
        level off the grid (float16 and wider dtypes hold every level far closer), or outside
        [0, 1], raise (one host sync)."""
        scaled = x.double() * (self.levels - 1)
        k = scaled.round()
        if not bool(((scaled - k).abs() <= 0.25).all() & (k >= 0).all() & (k < self.levels).all()):
            raise ValueError(f"x must hold pixel levels k / {self.levels - 1} in [0, 1] (k = 0..{self.levels - 1}) "
                             f"for {self!r}; load the data with levels={self.levels}")
        return k.long()

    @abstractmethod
    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log r(x | params) [B] in nats, summed over channels and pixels.

        params [B, param_channels, H, W]; x [B, channels, H, W] in [0, 1] on the likelihood's grid.
        """

    @abstractmethod
    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, channels, H, W] ~ r(x | params), values k / (levels - 1)."""

    @abstractmethod
    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The expected image E[x | params], [B, channels, H, W] in [0, 1]."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels})"


class Bernoulli(Likelihood):
    """Binarised images (values 0 and 1): one logit per channel and pixel (P = C).

    ``nll`` is the Bernoulli cross-entropy with logits summed over pixels (not checked against
    the grid: any x in [0, 1] gives the cross-entropy).
    """

    name = "bernoulli"
    levels = 2

    def __init__(self, channels: int = 1) -> None:
        super().__init__(channels)
        self.param_channels = channels

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self._check(params, x)
        dtype = _compute_dtype(params)
        return F.binary_cross_entropy_with_logits(params.to(dtype), x.to(dtype), reduction="none").flatten(1).sum(1)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.bernoulli(self.mean(params), generator=generator)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        self._check(params)
        return torch.sigmoid(params.to(_compute_dtype(params)))


class Categorical(Likelihood):
    """8-bit images: a 256-way softmax per channel and pixel, channels independent given z.

    params [B, 256 * C, H, W]: channel c's logits are ``params[:, 256 * c : 256 * (c + 1)]``.
    """

    name = "categorical"
    levels = LEVELS

    def __init__(self, channels: int = 1) -> None:
        super().__init__(channels)
        self.param_channels = LEVELS * channels

    def _logits(self, params: torch.Tensor) -> torch.Tensor:
        """[B, 256, C, H, W] in the compute dtype (the class dimension second, as cross_entropy wants)."""
        b, _, h, w = params.shape
        return params.to(_compute_dtype(params)).view(b, self.channels, LEVELS, h, w).transpose(1, 2)

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self._check(params, x)
        return F.cross_entropy(self._logits(params), self._level_index(x), reduction="none").flatten(1).sum(1)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self._check(params)
        logits = self._logits(params)
        probs = torch.softmax(logits, 1).movedim(1, -1).reshape(-1, LEVELS)
        k = torch.multinomial(probs, 1, generator=generator).view(logits.shape[:1] + logits.shape[2:])
        return k.to(logits.dtype) / (LEVELS - 1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        self._check(params)
        logits = self._logits(params)
        values = torch.arange(LEVELS, device=params.device, dtype=logits.dtype) / (LEVELS - 1)
        return torch.einsum("bkchw,k->bchw", torch.softmax(logits, 1), values)


def _log1mexp(t: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(t)) for t < 0 without cancellation (Maechler, 2012: expm1 near 0, log1p far)."""
    return torch.where(t > -math.log(2.0), torch.log(-torch.expm1(t)), torch.log1p(-torch.exp(t)))


class DiscretizedLogisticMixture(Likelihood):
    """8-bit images under a mixture of ``components`` (M) discretised logistics per pixel (PixelCNN++).

    A pixel's channels are rescaled to y = 2 x - 1 in [-1, 1]; level k is the bin of half-width
    1/255 around y_k = 2 k / 255 - 1, the first and last bins extended to -inf and +inf, so the
    256 probabilities sum to one. Component m has a weight pi_m (shared by the channels), and
    for channel c a location mu_cm + sum_{i<c} a_cim y_i (the PixelCNN++ channel coupling: the
    colour of a pixel is coded channel by channel) and a log-scale log s_cm.

    params [B, P, H, W], P = M (1 + 2 C + C (C - 1) / 2), in this order along dimension 1:
    M mixture logits; C * M locations (channel c, component m at c * M + m); C * M raw
    log-scales; C (C - 1) / 2 * M raw coupling coefficients (pairs (c, i), i < c, in the order
    (1, 0), (2, 0), (2, 1), ...). The log-scales are bounded to (-``log_scale_bound``,
    +``log_scale_bound``) (default 7: s in (0.0009, 1097), the smallest bin is 4.3 of the
    smallest scales wide) by ``bound * tanh(raw / bound)``, the identity near 0, so the
    gradients never vanish at a clamp; the coefficients are ``tanh(raw)``.

    Bin probabilities are computed in log space without subtracting CDFs: for a bin [a, b] in
    units of s, sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - exp(a - b)), so
    log P = logsigmoid(b) + logsigmoid(-a) + log(1 - exp(-2 / (255 s))), finite and accurate
    however far the bin lies in either tail (no fallback to the density, as PixelCNN++ needs).
    """

    name = "logistic"
    levels = LEVELS

    def __init__(self, channels: int = 1, components: int = 5, log_scale_bound: float = 7.0) -> None:
        super().__init__(channels)
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(f"components must be an integer >= 1, got {components!r}")
        if not log_scale_bound > 0:
            raise ValueError(f"log_scale_bound must be > 0, got {log_scale_bound!r}")
        self.components = components
        self.log_scale_bound = float(log_scale_bound)
        self.pairs = [(c, i) for c in range(channels) for i in range(c)]
        self.param_channels = components * (1 + 2 * channels + len(self.pairs))

    def __repr__(self) -> str:
        return (f"DiscretizedLogisticMixture(channels={self.channels}, components={self.components}, "
                f"log_scale_bound={self.log_scale_bound})")

    def _split(
        self, params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> log-weights [B, M, H, W], locations and log-scales [B, C, M, H, W], coefficients
        [B, pairs, M, H, W], in the compute dtype."""
        b, _, h, w = params.shape
        m, c = self.components, self.channels
        p = params.to(_compute_dtype(params))
        logits, loc, raw_ls, raw_coef = p.split([m, c * m, c * m, len(self.pairs) * m], 1)
        bound = self.log_scale_bound
        log_scales = bound * torch.tanh(raw_ls / bound)
        return (torch.log_softmax(logits, 1), loc.view(b, c, m, h, w), log_scales.view(b, c, m, h, w),
                torch.tanh(raw_coef).view(b, len(self.pairs), m, h, w))

    def _locations(self, loc: torch.Tensor, coef: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Coupled locations: channel c's plus sum_{i<c} a_ci y_i. loc [B, C, ...], coef [B, pairs, ...],
        y [B, C, ...] broadcastable to them (a component dimension of 1 or M)."""
        if not self.pairs:
            return loc
        shifts = [torch.zeros_like(loc[:, 0]) for _ in range(self.channels)]
        for j, (c, i) in enumerate(self.pairs):
            shifts[c] = shifts[c] + coef[:, j] * y[:, i]
        return loc + torch.stack(shifts, 1)

    @staticmethod
    def _bin_log_prob(k: torch.Tensor, y: torch.Tensor, loc: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
        """log P(level k) under Logistic(loc, exp(log_scales)) discretised to 256 bins, elementwise."""
        inv_s = torch.exp(-log_scales)
        half = 1.0 / (LEVELS - 1)
        centred = y - loc
        upper = inv_s * (centred + half)  # b: the bin's upper edge in units of s
        lower = inv_s * (centred - half)  # a: its lower edge
        below = F.logsigmoid(upper)  # log P(X < b): the first bin
        above = F.logsigmoid(-lower)  # log P(X > a): the last bin
        middle = below + above + _log1mexp(-2.0 * half * inv_s)
        return torch.where(k == 0, below, torch.where(k == LEVELS - 1, above, middle))

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self._check(params, x)
        log_w, loc, log_scales, coef = self._split(params)
        k = self._level_index(x).unsqueeze(2)  # [B, C, 1, H, W]
        y = 2.0 * k.to(loc.dtype) / (LEVELS - 1) - 1.0
        per_channel = self._bin_log_prob(k, y, self._locations(loc, coef, y), log_scales)
        return -torch.logsumexp(log_w + per_channel.sum(1), 1).flatten(1).sum(1)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A component per pixel, then the channels in order, each a logistic draw rounded to its
        bin (exact: a draw lands in level k's bin with probability P(level k)), the later
        channels' locations coupled to the earlier channels' drawn levels."""
        self._check(params)
        log_w, loc, log_scales, coef = self._split(params)
        b, c, m, h, w = loc.shape
        comp = torch.multinomial(log_w.exp().movedim(1, -1).reshape(-1, m), 1, generator=generator)
        comp = comp.view(b, 1, 1, h, w)
        pick = lambda t: t.gather(2, comp.expand(-1, t.shape[1], -1, -1, -1)).squeeze(2)
        loc, scales = pick(loc), pick(log_scales).exp()
        coef = pick(coef)
        y, k = torch.zeros_like(loc), torch.zeros_like(loc)
        for ch in range(c):
            mu = self._locations(loc, coef, y)[:, ch]  # uses the levels drawn for the channels before ch
            u = torch.rand(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            draw = mu + scales[:, ch] * (torch.log(u) - torch.log1p(-u))
            k[:, ch] = ((draw + 1.0) * (0.5 * (LEVELS - 1))).round().clamp(0, LEVELS - 1)
            y[:, ch] = 2.0 * k[:, ch] / (LEVELS - 1) - 1.0
        return k / (LEVELS - 1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x], from the bins' CDFs: E[k] = sum_{k=1..255} P(level >= k) per component. Exact for
        C = 1 (and whenever the coupling coefficients are zero); for C > 1 the coupling is
        evaluated at the earlier channels' expected values (a picture, not a moment)."""
        self._check(params)
        log_w, loc, log_scales, coef = self._split(params)
        inv_s = torch.exp(-log_scales)
        expected_y = torch.zeros_like(loc)  # [B, C, M, H, W]: E[y_c | component m]
        for ch in range(self.channels):
            mu = self._locations(loc, coef, expected_y)[:, ch]  # uses the channels before ch only
            expected_k = torch.zeros_like(mu)
            for level in range(1, LEVELS):  # P(level >= k) = 1 - F(the lower edge of bin k)
                edge = 2.0 * level / (LEVELS - 1) - 1.0 - 1.0 / (LEVELS - 1)
                expected_k = expected_k + torch.sigmoid((mu - edge) * inv_s[:, ch])
            expected_y[:, ch] = 2.0 * expected_k / (LEVELS - 1) - 1.0
        return (log_w.exp().unsqueeze(1) * (expected_y + 1.0) / 2.0).sum(2)


LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": Bernoulli, "logistic": DiscretizedLogisticMixture, "categorical": Categorical,
}


def make_likelihood(name: str, channels: int, **kwargs: object) -> Likelihood:
    """The likelihood ``name`` ("bernoulli" | "logistic" | "categorical") for images of
    ``channels`` channels; ``kwargs`` go to its constructor (e.g. ``components`` for "logistic")."""
    if name not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {sorted(LIKELIHOODS)}, got {name!r}")
    return LIKELIHOODS[name](channels, **kwargs)  # type: ignore[arg-type]


__all__ = ["LEVELS", "LIKELIHOODS", "Bernoulli", "Categorical", "DiscretizedLogisticMixture", "Likelihood",
           "bits_per_dim", "make_likelihood"]
