"""Pixel likelihoods of the ACN layer (acn_kernels.acn.likelihood), issue 13: Bernoulli, the
discretised logistic mixture and the 256-way categorical, against torch.distributions in float64
(the logistic bins as CDF differences), against mpmath deep in the tails, normalisation over
every level, gradients at the edge bins, exact sampling, and a colour (C = 3) case."""

from __future__ import annotations

import json
import math
import os

import mpmath
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import (
    AffineTransform,
    Bernoulli,
    Categorical,
    SigmoidTransform,
    TransformedDistribution,
    Uniform,
)

from acn_kernels.acn import cli, rng, train
from acn_kernels.acn import data as acn_data
from acn_kernels.acn import likelihood as lk
from acn_kernels.acn.checkpoint import CHECKPOINT, load_checkpoint
from acn_kernels.acn.config import TrainConfig
from acn_kernels.acn.models import build_model
from acn_kernels.acn.networks import ConvDecoder, MLPDecoder, PixelCNNDecoder, decode_sample

LEVELS = torch.arange(256, dtype=torch.float64) / 255


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and extra threads compete on a shared runner)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(like: lk.Likelihood, b: int, h: int, w: int, scale: float = 1.0, seed: int = 0,
            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return (scale * torch.randn(b, like.param_channels, h, w, generator=_gen(seed), dtype=torch.float64)).to(dtype)


def _levels(b: int, c: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    """Random 8-bit images, the edge levels 0 and 255 forced into the first pixels."""
    k = torch.randint(0, 256, (b, c, h, w), generator=_gen(seed))
    k.view(-1)[0], k.view(-1)[1] = 0, 255
    return k.double() / 255


# ------------------------------------------------------------------------------------------------
# Discretised logistic mixture: the reference


def _logistic(loc: torch.Tensor, scale: torch.Tensor) -> TransformedDistribution:
    base = Uniform(torch.zeros_like(loc), torch.ones_like(loc))
    return TransformedDistribution(base, [SigmoidTransform().inv, AffineTransform(loc, scale)])


def _reference_nll(params: torch.Tensor, x: torch.Tensor, c: int, m: int, bound: float = 7.0) -> torch.Tensor:
    """-log p(x) [B] from torch.distributions' logistic CDF, float64, one channel at a time:
    bin probabilities as CDF differences, the edge bins open-ended, the documented layout."""
    params, x = params.double(), x.double()
    pairs = [(ch, i) for ch in range(c) for i in range(ch)]
    logits = params[:, :m]
    loc = params[:, m : m + c * m]
    log_s = bound * torch.tanh(params[:, m + c * m : m + 2 * c * m] / bound)
    coef = torch.tanh(params[:, m + 2 * c * m :])
    y = 2 * x - 1
    total = torch.log_softmax(logits, 1)  # [B, M, H, W]
    for ch in range(c):
        mu = loc[:, ch * m : (ch + 1) * m].clone()
        for j, (cc, i) in enumerate(pairs):
            if cc == ch:
                mu = mu + coef[:, j * m : (j + 1) * m] * y[:, i : i + 1]
        dist = _logistic(mu, log_s[:, ch * m : (ch + 1) * m].exp())
        yc = y[:, ch : ch + 1].expand_as(mu)
        hi = torch.where(yc > 1 - 1e-9, torch.ones_like(mu), dist.cdf(yc + 1 / 255))
        lo = torch.where(yc < -1 + 1e-9, torch.zeros_like(mu), dist.cdf(yc - 1 / 255))
        total = total + torch.log(hi - lo)
    return -torch.logsumexp(total, 1).flatten(1).sum(1)


@pytest.mark.parametrize("c, m", [(1, 1), (1, 3), (2, 2), (3, 4)])
def test_logistic_matches_torch_distributions(c, m):
    like = lk.DiscretizedLogisticMixture(c, m)
    assert like.param_channels == m * (1 + 2 * c + c * (c - 1) // 2)
    params, x = _params(like, 3, 4, 5, seed=c + m), _levels(3, c, 4, 5, seed=c * m)
    ref = _reference_nll(params, x, c, m)
    out = like.nll(params, x)
    assert out.dtype == torch.float64 and out.shape == (3,)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=0)
    out32 = like.nll(params.float(), x.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=2e-6, atol=0)
    half = like.nll(params.half(), x.half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), _reference_nll(params.half(), x, c, m), rtol=1e-5, atol=0)


def _all_levels_nll(like: lk.Likelihood, params: torch.Tensor) -> torch.Tensor:
    """-log p of every level of a one-channel pixel: params [P] -> [256]."""
    return like.nll(params.view(1, -1, 1, 1).expand(256, -1, 1, 1), LEVELS.to(params.dtype).view(256, 1, 1, 1))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("regime", ["moderate", "narrow", "wide", "far-left", "far-right", "huge-raw"])
def test_logistic_levels_sum_to_one(dtype, tol, regime):
    """sum_k exp(-nll(k)) = 1 per pixel, whatever the parameters (narrowest and widest scales,
    locations far outside [-1, 1], raw outputs far beyond the bounds)."""
    like = lk.DiscretizedLogisticMixture(1, 3)
    base = torch.randn(9, generator=_gen(7), dtype=torch.float64)
    logits, loc, raw_ls = base[:3], base[3:6], base[6:]
    if regime == "narrow":
        raw_ls = raw_ls - 40  # at the bound: s = exp(-7) ~ 0.0009, under a quarter of a bin
    elif regime == "wide":
        raw_ls = raw_ls + 40  # s = exp(7) ~ 1097, 140,000 bins wide
    elif regime == "far-left":
        loc = loc - 50
    elif regime == "far-right":
        loc = loc + 50
    elif regime == "huge-raw":
        logits, loc, raw_ls = 1e4 * logits, 1e3 * loc, 1e6 * raw_ls
    params = torch.cat([logits, loc, raw_ls]).to(dtype)
    nll = _all_levels_nll(like, params)
    assert torch.isfinite(nll).all()
    assert abs(float(torch.exp(-nll.double()).sum()) - 1) < tol


def test_logistic_coupled_channels_sum_to_one():
    """C = 2 with coupling coefficients: the joint over all 256 x 256 level pairs sums to one."""
    like = lk.DiscretizedLogisticMixture(2, 2)
    params = _params(like, 1, 1, 1, scale=2.0, seed=3).view(1, -1, 1, 1)
    params[:, -2:] = 3.0  # tanh(3) ~ 0.995: strong coupling of channel 1 to channel 0
    x = _all_pairs()
    nll = like.nll(params.expand(x.shape[0], -1, -1, -1), x)
    assert abs(float(torch.exp(-nll).sum()) - 1) < 1e-11


def _all_pairs() -> torch.Tensor:
    """Every two-channel 8-bit pixel, [65536, 2, 1, 1], channel 0's level major."""
    k0, k1 = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    return torch.stack([k0.flatten(), k1.flatten()], 1).view(-1, 2, 1, 1).double() / 255


def _chi2_ok(draws: torch.Tensor, p: torch.Tensor) -> bool:
    """Pearson's chi-square of sampled levels (draws in [0, 1]) against probabilities p [256]:
    levels expecting fewer than 5 draws pooled; passes below df + 6 sqrt(2 df) (a 6-sigma bound)."""
    n = draws.numel()
    counts = torch.bincount((draws.flatten() * 255).round().long(), minlength=256).double()
    big = p * n >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([p[big] * n, (p[~big] * n).sum().view(1)])
    keep = exp > 0
    chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return chi2 < df + 6 * (2 * df) ** 0.5


def _mp_log_bin(k: int, loc: float, raw_ls: float, bound: float = 7.0) -> float:
    """log P(level k) of a one-component logistic, in 400-digit arithmetic."""
    with mpmath.workdps(400):  # bins up to ~900 scales deep in a tail
        s = mpmath.exp(bound * mpmath.tanh(mpmath.mpf(raw_ls) / bound))
        y = mpmath.mpf(2 * k) / 255 - 1
        cdf = lambda t: 1 / (1 + mpmath.exp(-(t - mpmath.mpf(loc)) / s))
        hi = 1 if k == 255 else cdf(y + mpmath.mpf(1) / 255)
        lo = 0 if k == 0 else cdf(y - mpmath.mpf(1) / 255)
        return float(mpmath.log(hi - lo))


@pytest.mark.parametrize("k, loc, raw_ls", [
    (128, -0.9, -3.0), (128, 0.9, -3.0),  # mid bins ~100 scales into the left and right tails
    (3, 1.0, -6.0), (250, -1.0, -6.0),  # ~400 scales deep: CDF differences vanish in float64
    (0, 30.0, -2.0), (255, -30.0, -2.0),  # edge bins deep in their tails
    (0, -30.0, -2.0), (255, 30.0, -2.0),  # edge bins holding almost all the mass
    (17, 17 * 2 / 255 - 1, -60.0),  # the narrowest scale, centred on its bin
    (17, 0.3, 60.0),  # the widest scale
])
def test_logistic_tails_match_mpmath(k, loc, raw_ls):
    like = lk.DiscretizedLogisticMixture(1, 1)
    want = _mp_log_bin(k, loc, raw_ls)
    x = torch.tensor([[[[k / 255]]]], dtype=torch.float64)
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        params = torch.tensor([0.0, loc, raw_ls], dtype=dtype).view(1, 3, 1, 1)
        got = -float(like.nll(params, x.to(dtype)))
        assert math.isclose(got, want, rel_tol=rtol, abs_tol=1e-12 if dtype == torch.float64 else 1e-6), \
            (dtype, got, want)


def test_logistic_gradients_match_finite_differences_at_the_edges():
    like = lk.DiscretizedLogisticMixture(3, 2)
    params = _params(like, 2, 2, 2, seed=5).requires_grad_()
    x = _levels(2, 3, 2, 2, seed=6)
    x[0, :, 0, 0], x[1, :, 1, 1] = 0.0, 1.0  # every channel of a pixel in an edge bin
    assert torch.autograd.gradcheck(lambda p: like.nll(p, x), (params,))


@pytest.mark.parametrize("shift", [0.0, 1e2, -1e2, 1e4])
def test_logistic_gradients_finite_in_float32(shift):
    """Edge levels and interior ones, parameters far beyond the bounds or the image range."""
    like = lk.DiscretizedLogisticMixture(3, 3)
    params = (_params(like, 4, 3, 3, scale=30.0, seed=8, dtype=torch.float32) + shift).requires_grad_()
    x = _levels(4, 3, 3, 3, seed=9).float()
    x[:2] = torch.where(x[:2] > 0.5, 1.0, 0.0)  # half the images only in the two edge bins
    nll = like.nll(params, x)
    assert torch.isfinite(nll).all()
    nll.sum().backward()
    assert torch.isfinite(params.grad).all()


def test_logistic_sampling_is_exact():
    """Sample frequencies of one pixel's 256 levels and the sample mean match exp(-nll) and
    mean(): rounding a logistic draw to its bin must reproduce the discretised probabilities."""
    like = lk.DiscretizedLogisticMixture(1, 2)
    params = torch.tensor([0.3, -0.2, -0.6, 0.95, -3.0, -2.0], dtype=torch.float64)  # one mode at the top edge
    p = torch.exp(-_all_levels_nll(like, params))
    n = 200_000
    draws = like.sample(params.view(1, -1, 1, 1).expand(n, -1, 1, 1), _gen(11))
    assert draws.shape == (n, 1, 1, 1)
    assert torch.equal((draws * 255).round() / 255, draws)
    assert _chi2_ok(draws, p)
    assert not _chi2_ok(draws, torch.roll(p, 1))  # the test can tell a shift by one level
    exact_mean = float((p * LEVELS).sum())
    assert math.isclose(float(like.mean(params.view(1, -1, 1, 1))), exact_mean, rel_tol=1e-10)
    assert abs(float(draws.mean()) - exact_mean) < 4 * float(((LEVELS - exact_mean) ** 2 * p).sum().sqrt()) / n**0.5


def test_logistic_coupled_sampling_uses_the_drawn_levels():
    """C = 2, strong coupling: channel 1's sample marginal matches the exact marginal."""
    like = lk.DiscretizedLogisticMixture(2, 1)
    params = torch.tensor([0.0, -0.5, 0.0, -2.5, -2.5, 2.0], dtype=torch.float64).view(1, 6, 1, 1)
    x = _all_pairs()
    joint = torch.exp(-like.nll(params.expand(x.shape[0], -1, -1, -1), x)).view(256, 256)
    n = 100_000
    draws = like.sample(params.expand(n, -1, -1, -1), _gen(12))
    assert _chi2_ok(draws[:, 1], joint.sum(0))
    assert not _chi2_ok(draws[:, 1], joint.sum(1))  # channel 0's marginal differs: the test can tell
    # without the coupling the marginal of channel 1 is centred at 0 (level 127.5), with it near -0.5
    assert abs(float(draws[:, 1].mean()) - float((joint.sum(0) * LEVELS).sum())) < 0.003


def test_colour_images():
    """A small RGB (C = 3) case end to end: nll against the reference, samples on the grid, the
    mean exact when the channels are uncoupled."""
    like = lk.make_likelihood("logistic", 3, components=2)
    params = _params(like, 2, 3, 4, seed=13, dtype=torch.float32)
    x = _levels(2, 3, 3, 4, seed=14).float()
    torch.testing.assert_close(like.nll(params, x).double(), _reference_nll(params, x, 3, 2), rtol=2e-6, atol=0)
    s = like.sample(params, _gen(15))
    assert s.shape == (2, 3, 3, 4) and s.dtype == torch.float32
    assert torch.equal((s * 255).round() / 255, s) and s.min() >= 0 and s.max() <= 1
    uncoupled = params.double().clone()
    uncoupled[:, 2 * (1 + 2 * 3) :] = 0.0  # tanh(0) = 0: no coupling
    m = like.mean(uncoupled)
    for ch in range(3):  # channel ch alone is a one-channel mixture with the shared weights
        single = lk.DiscretizedLogisticMixture(1, 2)
        sp = torch.cat([uncoupled[:, :2], uncoupled[:, 2 + 2 * ch : 4 + 2 * ch],
                        uncoupled[:, 8 + 2 * ch : 10 + 2 * ch]], 1)
        torch.testing.assert_close(m[:, ch : ch + 1], single.mean(sp), rtol=1e-12, atol=0)
    cat = lk.make_likelihood("categorical", 3)
    cp = _params(cat, 2, 3, 4, seed=16, dtype=torch.float32)
    assert cat.sample(cp, _gen(17)).shape == (2, 3, 3, 4)
    torch.testing.assert_close(cat.nll(cp, x).double(), _reference_categorical(cp, x), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# Categorical and Bernoulli


def _reference_categorical(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    logits = params.double().view(b, c, 256, h, w).movedim(2, -1)
    return -Categorical(logits=logits).log_prob((x.double() * 255).round().long()).flatten(1).sum(1)


def test_categorical_matches_torch_distributions():
    like = lk.Categorical(1)
    assert like.param_channels == 256
    params, x = _params(like, 3, 4, 4, scale=3.0, seed=20), _levels(3, 1, 4, 4, seed=21)
    torch.testing.assert_close(like.nll(params, x), _reference_categorical(params, x), rtol=1e-12, atol=0)
    p = torch.exp(-_all_levels_nll(like, params[0, :, 0, 0]))
    torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(like.mean(params)[0, 0, 0, 0], (p * LEVELS).sum(), rtol=1e-12, atol=0)
    n = 100_000
    draws = like.sample(params[:1, :, :1, :1].expand(n, -1, -1, -1), _gen(22))
    assert _chi2_ok(draws, p)


def test_bernoulli_is_the_existing_cross_entropy():
    like = lk.Bernoulli(1)
    params = _params(like, 4, 5, 5, scale=4.0, seed=30, dtype=torch.float32)
    x = (torch.rand(4, 1, 5, 5, generator=_gen(31)) > 0.5).float()
    want = F.binary_cross_entropy_with_logits(params, x, reduction="none").flatten(1).sum(1)  # the old bernoulli_nll
    assert torch.equal(like.nll(params, x), want)
    ref = -Bernoulli(logits=params.double()).log_prob(x.double()).flatten(1).sum(1)
    torch.testing.assert_close(like.nll(params.double(), x.double()), ref, rtol=1e-12, atol=0)
    assert torch.equal(like.mean(params), torch.sigmoid(params))
    s = like.sample(params, _gen(32))
    assert s.shape == x.shape and bool(((s == 0) | (s == 1)).all())


def test_bits_per_dim():
    """Uniform codes cost exactly log2(levels) bits per dimension."""
    shape = (3, 4, 5)
    zeros = lambda like: torch.zeros(2, like.param_channels, 4, 5, dtype=torch.float64)
    cat, bern = lk.Categorical(3), lk.Bernoulli(3)
    nll = cat.nll(zeros(cat), _levels(2, 3, 4, 5).double())
    torch.testing.assert_close(lk.bits_per_dim(nll, shape), torch.full((2,), 8.0, dtype=torch.float64))
    nll = bern.nll(zeros(bern), torch.ones(2, 3, 4, 5, dtype=torch.float64))
    torch.testing.assert_close(lk.bits_per_dim(nll, shape), torch.full((2,), 1.0, dtype=torch.float64))
    assert math.isclose(lk.bits_per_dim(784 * math.log(2.0), (1, 28, 28)), 1.0)


# ------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_names_the_argument():
    like = lk.DiscretizedLogisticMixture(1, 2)
    params, x = torch.zeros(2, 6, 3, 3), torch.zeros(2, 1, 3, 3)
    with pytest.raises(ValueError, match=r"params must have shape \[B, 6, H, W\]"):
        like.nll(torch.zeros(2, 5, 3, 3), x)
    with pytest.raises(ValueError, match=r"x must have shape \[2, 1, 3, 3\]"):
        like.nll(params, torch.zeros(2, 1, 3, 4))
    with pytest.raises(TypeError, match="params must be a floating tensor"):
        like.nll(params.long(), x)
    for bad in (x + 0.3 / 255, x - 1 / 255, x + 2):  # off the grid, below 0, above 1
        with pytest.raises(ValueError, match="pixel levels k / 255"):
            like.nll(params, bad)
    with pytest.raises(ValueError, match="pixel levels"):
        lk.Categorical(1).nll(torch.zeros(2, 256, 3, 3), x * 255 + 255)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        lk.make_likelihood("gaussian", 1)
    for bad_channels in (0, True, 1.0):
        with pytest.raises(ValueError, match="channels must be an integer"):
            lk.Bernoulli(bad_channels)
    with pytest.raises(ValueError, match="components must be"):
        lk.DiscretizedLogisticMixture(1, 0)
    with pytest.raises(ValueError, match="log_scale_bound"):
        lk.DiscretizedLogisticMixture(1, 2, log_scale_bound=0.0)


# ------------------------------------------------------------------------------------------------
# Wired into the ACN layer: decoders, models, the training loop, acn-train and acn-eval


def _make(name: str, channels: int) -> lk.Likelihood:
    return lk.make_likelihood(name, channels, **({"components": 2} if name == "logistic" else {}))


@pytest.mark.parametrize("name", sorted(lk.LIKELIHOODS))
@pytest.mark.parametrize("decoder", ["mlp", "conv", "pixelcnn"])
@pytest.mark.parametrize("channels", [1, 3])
def test_decoders_emit_their_likelihoods_parameters(name, decoder, channels):
    shape = (channels, 4, 4)
    like = _make(name, channels)
    torch.manual_seed(0)
    dec = {"mlp": lambda: MLPDecoder(3, shape, (16,), likelihood=like),
           "conv": lambda: ConvDecoder(3, shape, 4, likelihood=like),
           "pixelcnn": lambda: PixelCNNDecoder(3, shape, 4, 2, likelihood=like)}[decoder]()
    assert dec.likelihood is like
    z = torch.randn(2, 3)
    x = (torch.randint(0, 2, (2, *shape)) if like.levels == 2 else torch.randint(0, 256, (2, *shape))).float()
    x = x / (like.levels - 1)
    params = dec(z, x)
    assert params.shape == (2, like.param_channels, 4, 4)
    nll = like.nll(params, x)
    assert nll.shape == (2,) and torch.isfinite(nll).all()
    nll.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dec.parameters())
    images = decode_sample(dec, z, _gen(1))
    assert images.shape == (2, *shape) and images.min() >= 0 and images.max() <= 1
    assert torch.equal((images * (like.levels - 1)).round() / (like.levels - 1), images)
    if not dec.autoregressive:
        mean = decode_sample(dec, z, mean=True)
        assert mean.shape == (2, *shape) and mean.min() >= 0 and mean.max() <= 1


def test_decoder_likelihood_must_fit_the_image():
    with pytest.raises(ValueError, match="likelihood is for 1-channel images"):
        MLPDecoder(3, (3, 4, 4), likelihood=lk.Bernoulli(1))
    with pytest.raises(TypeError, match="likelihood must be"):
        MLPDecoder(3, (1, 4, 4), likelihood="logistic")
    with pytest.raises(ValueError, match="likelihood must be one of"):
        build_model(num_codes=10, likelihood="gaussian")


@pytest.mark.parametrize("kind", ["acn", "vae"])
def test_the_default_is_the_bernoulli_cross_entropy(kind):
    """Unchanged default: a Bernoulli decoder whose recon is the cross-entropy of its logits,
    with the same weights whether the likelihood is named or not."""
    torch.manual_seed(0)
    model = build_model(kind, num_codes=30)
    torch.manual_seed(0)
    named = build_model(kind, num_codes=30, likelihood="bernoulli")
    assert isinstance(model.decoder.likelihood, lk.Bernoulli) and model.decoder.likelihood.param_channels == 1
    for (key, a), b in zip(model.state_dict().items(), named.state_dict().values(), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key
    x = (torch.rand(6, 1, 28, 28, generator=_gen(2)) > 0.5).float()
    idx = torch.arange(6)
    terms = model(x, idx)
    code = model.encode(x)
    seed = model.bank.seed if kind == "acn" else model.seed
    z = code + rng.normal(seed, rng.EPS, 0, idx, code.shape[1], code.dtype)
    logits = model.decoder(z)
    want = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    assert torch.equal(terms.recon, want)


def _grey_data(n_train: int = 48, n_test: int = 16) -> acn_data.ImageData:
    """Random 8 x 8 grey images, 8-bit, with labels."""
    k = torch.randint(0, 256, (n_train + n_test, 1, 8, 8), generator=_gen(3), dtype=torch.uint8)
    return acn_data.from_tensors(k[:n_train], torch.arange(n_train) % 4, k[n_train:], torch.arange(n_test) % 4,
                                 levels=256)


@pytest.mark.parametrize("name", ["logistic", "categorical"])
def test_training_loop_reports_bits_per_dim(name):
    data = _grey_data()
    config = TrainConfig(likelihood=name, logistic_components=2, decoder="conv", batch_size=16, code_dim=4,
                         minutes=None, epochs=2, checkpoint_every=0)
    model = config.build(data.train_x.shape[0], data.image_shape)
    history = train.train(model, data, config, progress=False)
    dims = 8 * 8 * math.log(2.0)
    for row in history:
        assert row["train_bpd"] == pytest.approx(row["train_loss"] / dims, rel=1e-12)
        assert row["test_bpd"] == pytest.approx(row["test_loss"] / dims, rel=1e-12)
        assert 0 < row["test_bpd"] < 20


def test_training_refuses_data_on_another_grid():
    binary = acn_data.from_tensors((torch.rand(20, 1, 8, 8, generator=_gen(4)) > 0.5).float())
    config = TrainConfig(likelihood="logistic", decoder="conv", batch_size=8, code_dim=4, minutes=None, steps=1)
    model = config.build(binary.train_x.shape[0], binary.image_shape)
    with pytest.raises(ValueError, match="the data have 2 pixel levels but the decoder's"):
        train.train(model, binary, config, progress=False)
    grey = _grey_data()
    config = TrainConfig(decoder="conv", batch_size=8, code_dim=4, minutes=None, steps=1)
    with pytest.raises(ValueError, match="the data have 256 pixel levels"):
        train.train(config.build(48, grey.image_shape), grey, config, progress=False)


def test_commands_grey_and_colour(tmp_path):
    """acn-train --likelihood logistic on a .pt of uint8 digits-like images and on a folder of
    RGB PNGs (C = 3), the report included; acn-eval prints bits/dim; --resume keeps the likelihood."""
    from PIL import Image

    grey = _grey_data()
    torch.save({"train_x": (grey.train_x * 255).round().to(torch.uint8), "train_y": grey.train_y,
                "test_x": (grey.test_x * 255).round().to(torch.uint8), "test_y": grey.test_y}, tmp_path / "grey.pt")
    out = str(tmp_path / "grey")
    args = ["--data", str(tmp_path / "grey.pt"), "--out", out, "--likelihood", "logistic", "--logistic-components",
            "2", "--batch-size", "16", "--code-dim", "4", "--no-progress", "--minutes", "0"]
    assert cli.train_main([*args, "--steps", "2"]) == 0
    assert cli.train_main([*args, "--steps", "4", "--resume"]) == 0
    ckpt = load_checkpoint(os.path.join(out, CHECKPOINT))
    assert ckpt["config"]["likelihood"] == "logistic" and ckpt["config"]["logistic_components"] == 2
    assert ckpt["position"]["step"] == 4
    final = json.loads(open(os.path.join(out, "metrics.json")).read())["final"]["heldout"]
    assert final["test_bpd"] == pytest.approx(final["test_loss"] / (64 * math.log(2.0)), rel=1e-12)

    colour = tmp_path / "colour"
    colour.mkdir()
    for i in range(24):
        pixels = torch.randint(0, 256, (8, 8, 3), generator=_gen(i), dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(colour / f"{i:02d}.png")
    cout = str(tmp_path / "colour-run")
    assert cli.train_main(["--data", str(colour), "--out", cout, "--likelihood", "logistic", "--decoder", "conv",
                           "--logistic-components", "2", "--batch-size", "8", "--code-dim", "4", "--epochs", "1",
                           "--minutes", "0", "--no-progress"]) == 0
    for name in ("reconstructions.png", "daydreams.png", "neighbours.png"):
        assert os.path.getsize(os.path.join(cout, name)) > 0, name
    assert load_checkpoint(os.path.join(cout, CHECKPOINT))["model"]["decoder.net.3.weight"].shape[1] == 2 * 10

    ev = str(tmp_path / "eval")
    assert cli.eval_main([out, cout, "--out", ev, "--no-grids", "--no-baselines"]) == 0
    table = open(os.path.join(ev, "eval.md")).read()
    assert "bits/dim" in table and "logistic" in table
    res = json.loads(open(os.path.join(ev, "eval.json")).read())
    assert all("test_bpd" in r["heldout"] for r in res.values())
