"""The ACN parts: prior network (against MixtureSameFamily), encoders, decoders (PixelCNN
causality), the ACN and VAE losses, daydreams, devices."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, Normal

from acn_kernels import ACN, VAE, CodeBank, MixturePrior
from acn_kernels.acn import rng
from acn_kernels.acn.models import build_model
from acn_kernels.acn.networks import (
    ConvDecoder,
    ConvEncoder,
    MLPDecoder,
    MLPEncoder,
    PixelCNNDecoder,
    bernoulli_nll,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPE = (1, 8, 8)


def small_acn(n: int = 20, d: int = 4, decoder: str = "mlp", seed: int = 0) -> ACN:
    torch.manual_seed(seed)
    dec = {"mlp": MLPDecoder(d, SHAPE, (32,)), "conv": ConvDecoder(d, SHAPE, 8),
           "pixelcnn": PixelCNNDecoder(d, SHAPE, 8, 3)}[decoder]
    return ACN(MLPEncoder(d, SHAPE, (32,)), dec, MixturePrior(d, 3, hidden=16),
               CodeBank(n, d, k=3, seed=seed))


def images(n: int, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


def mixture_oracle(z, logits, means, log_scales):
    mix = MixtureSameFamily(Categorical(logits=logits), Normal(means, log_scales.exp()))
    return mix.log_prob(z).sum(-1)


def test_prior_shapes_bounds_and_skip_connections():
    prior = MixturePrior(5, components=4, hidden=16, layers=3, log_scale_bound=2.0)
    assert [layer.in_features for layer in prior.hidden] == [5, 21, 21]
    assert prior.out.in_features == 48 and prior.out.out_features == 5 * 4 * 3
    params = prior(100 * torch.randn(7, 5))
    assert all(t.shape == (7, 5, 4) for t in params)
    assert float(params.log_scales.detach().abs().max()) < 2.0
    with pytest.raises(ValueError, match="code_dim=5"):
        prior(torch.randn(3, 4))
    with pytest.raises(ValueError, match="log_scale_bound"):
        MixturePrior(5, log_scale_bound=0)


def test_prior_default_is_the_papers_network():
    prior = MixturePrior(16)
    assert len(prior.hidden) == 3 and all(layer.out_features == 512 for layer in prior.hidden)
    assert prior.components == 3 and prior.out.in_features == 3 * 512


@pytest.mark.parametrize("backend", [None, "torch"])
def test_prior_log_prob_and_kl_against_mixture_same_family(backend):
    torch.manual_seed(0)
    prior = MixturePrior(6, hidden=16, backend=backend).double()
    c_hat, code = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    z = code + torch.randn_like(code)
    want = mixture_oracle(z, *prior(c_hat))
    torch.testing.assert_close(prior.log_prob(z, c_hat), want)
    log_q = Normal(code, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(prior.kl(z, code, c_hat), log_q - want)


def test_prior_gradients_match_the_oracle():
    torch.manual_seed(1)
    prior = MixturePrior(4, hidden=8)
    c_hat, z = torch.randn(5, 4), torch.randn(5, 4)
    prior.log_prob(z, c_hat).sum().backward()
    fused = [p.grad.clone() for p in prior.parameters()]
    prior.zero_grad()
    mixture_oracle(z, *prior(c_hat)).sum().backward()
    for g, p in zip(fused, prior.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


def test_prior_sample_follows_the_mixture():
    torch.manual_seed(2)
    prior = MixturePrior(3, components=2, hidden=8)
    c_hat = torch.randn(1, 3).expand(20000, 3)
    z = prior.sample(c_hat, torch.Generator().manual_seed(0))
    logits, means, log_scales = (t[0].detach() for t in prior(c_hat[:1]))
    w = torch.softmax(logits, -1)
    mean = (w * means).sum(-1)
    var = (w * (log_scales.exp() ** 2 + means**2)).sum(-1) - mean**2
    torch.testing.assert_close(z.mean(0), mean, atol=4 * float(var.max().sqrt()) / math.sqrt(20000), rtol=0)
    torch.testing.assert_close(z.var(0), var, rtol=0.05, atol=0.01)


@pytest.mark.parametrize("enc", [MLPEncoder, ConvEncoder])
@pytest.mark.parametrize("dec", [MLPDecoder, ConvDecoder])
def test_encoder_decoder_shapes(enc, dec):
    e, d = enc(5, SHAPE), dec(5, SHAPE)
    x = images(3)
    code = e(x)
    assert code.shape == (3, 5)
    assert d(code).shape == (3, *SHAPE)
    with pytest.raises(ValueError, match="x must have shape"):
        e(torch.zeros(3, 1, 8, 9))
    with pytest.raises(ValueError, match="divisible by 4"):
        ConvEncoder(5, (1, 6, 6))


def test_pixelcnn_is_causal_without_blind_spot():
    torch.manual_seed(0)
    dec = PixelCNNDecoder(3, SHAPE, channels=8, layers=3)
    z = torch.randn(1, 3)
    x = images(1).requires_grad_(True)
    h, w = SHAPE[1:]
    for i, j in [(0, 0), (3, 4), (5, 1), (7, 7)]:
        (g,) = torch.autograd.grad(dec(z, x)[0, 0, i, j], x)
        g = g[0, 0].abs()
        after = torch.arange(h * w).view(h, w) >= i * w + j
        assert float(g[after].max()) == 0.0, (i, j)  # never its own pixel or a later one
        if i > 0 and j + 2 < w:
            assert float(g[i - 1, j + 2]) > 0  # the up-right pixel a plain masked PixelCNN misses
        if j > 0:
            assert float(g[i, j - 1]) > 0
    with pytest.raises(ValueError, match="teacher forcing"):
        dec(z)


def test_pixelcnn_sample_is_binary():
    dec = PixelCNNDecoder(3, (1, 4, 4), channels=4, layers=2)
    x = dec.sample(torch.randn(2, 3), torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 4, 4) and bool(((x == 0) | (x == 1)).all())


def test_bernoulli_nll_in_nats():
    logits = torch.zeros(2, 1, 2, 2)
    want = torch.full((2,), 4 * math.log(2))
    torch.testing.assert_close(bernoulli_nll(logits, torch.ones(2, 1, 2, 2)), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decoder", ["mlp", "conv", "pixelcnn"])
def test_acn_forward(decoder, device):
    model = small_acn(decoder=decoder).to(device)
    x, idx = images(6).to(device), torch.tensor([3, 0, 7, 12, 5, 19], device=device)
    terms = model(x, idx)
    assert terms.loss.shape == terms.kl.shape == terms.recon.shape == (6,)
    torch.testing.assert_close(terms.loss, terms.kl + terms.recon)
    # The bank holds the fresh codes and marks the picked rows used.
    torch.testing.assert_close(model.bank.codes[idx], terms.code.detach())
    assert bool(model.bank.used[terms.rows].all()) and int(model.bank.used.sum()) == 6
    # The terms equal the loss written out by hand with the oracle mixture.
    eps = rng.normal(model.bank.seed, rng.EPS, 0, idx, 4)
    z = terms.code + eps
    log_p = mixture_oracle(z, *model.prior(model.bank.codes[terms.rows]))
    kl = Normal(terms.code, 1.0).log_prob(z).sum(-1) - log_p
    torch.testing.assert_close(terms.kl, kl, rtol=1e-4, atol=1e-4)
    terms.loss.mean().backward()
    for part in (model.encoder, model.decoder, model.prior):
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in part.parameters())
    model.new_pass()
    assert model.pass_index == 1 and not bool(model.bank.used.any())


def test_acn_state_dict_round_trip():
    a = small_acn(seed=1)
    a(images(5), torch.arange(5))
    a.new_pass()
    b = small_acn(seed=2)
    b.load_state_dict(a.state_dict())
    assert b.pass_index == 1 and torch.equal(a.bank.codes, b.bank.codes)
    x = images(4, seed=3)
    torch.testing.assert_close(a(x, torch.arange(4)).loss, b(x, torch.arange(4)).loss)


def test_acn_daydream():
    model = small_acn()
    dream = model.daydream(images(3), steps=4, generator=torch.Generator().manual_seed(0))
    assert dream.shape == (5, 3, *SHAPE)
    assert float(dream.min()) >= 0 and float(dream.max()) <= 1


def test_vae():
    torch.manual_seed(0)
    model = VAE(MLPEncoder(4, SHAPE, (16,)), MLPDecoder(4, SHAPE, (16,)), seed=3)
    x, idx = images(5), torch.arange(5)
    terms = model(x, idx)
    torch.testing.assert_close(terms.kl, 0.5 * terms.code.square().sum(1))
    torch.testing.assert_close(terms.loss, terms.kl + terms.recon)
    model.new_pass()
    state = model.state_dict()
    other = VAE(MLPEncoder(4, SHAPE, (16,)), MLPDecoder(4, SHAPE, (16,)))
    other.load_state_dict(state)
    assert other.pass_index == 1 and other.seed == 3


def test_build_model():
    acn = build_model(num_codes=10, image_shape=SHAPE, encoder="conv", decoder="pixelcnn", code_dim=3, k=2)
    assert isinstance(acn, ACN) and acn.bank.k == 2 and acn.bank.codes.shape == (10, 3)
    assert isinstance(build_model("vae", num_codes=10, image_shape=SHAPE), VAE)
    with pytest.raises(ValueError, match="decoder"):
        build_model(num_codes=10, decoder="transformer")
    with pytest.raises(ValueError, match="kind"):
        build_model("gan", num_codes=10)
    with pytest.raises(ValueError, match="code_dim"):
        ACN(MLPEncoder(4, SHAPE), MLPDecoder(4, SHAPE), MixturePrior(4, hidden=8), CodeBank(10, 5))


# ------------------------------------------------------------------------------------------------
# Issue 15: the PixelCNN decoder without masks (one-sided padding), conditioned in every gate


def test_pixelcnn_sees_every_earlier_pixel_and_no_later_one():
    """Five layers reach the whole 8x8 image, so output (i, j) must depend on every pixel before
    (i, j) in raster order (no blind spot) and on no other."""
    torch.manual_seed(0)
    dec = PixelCNNDecoder(3, SHAPE, channels=8, layers=5)
    z, x = torch.randn(1, 3), images(1).requires_grad_(True)
    h, w = SHAPE[1:]
    order = torch.arange(h * w).view(h, w)
    for i, j in [(0, 0), (0, 5), (3, 0), (4, 3), (7, 7)]:
        (g,) = torch.autograd.grad(dec(z, x)[0, 0, i, j], x)
        assert torch.equal(g[0, 0] != 0, order < i * w + j), (i, j)


def test_pixelcnn_conditions_every_gate_on_z():
    """Every layer's conditioning reaches the output: both stacks' halves, except the last
    layer's, whose vertical stack would feed nothing and is not computed."""
    torch.manual_seed(0)
    dec = PixelCNNDecoder(3, SHAPE, channels=4, layers=3)
    out = dec(torch.randn(2, 3), images(2)).sum()
    grads = torch.autograd.grad(out, [layer.cond.weight for layer in dec.layers])
    for n, g in enumerate(grads):
        halves = [g] if n == len(grads) - 1 else g.chunk(2, 0)
        assert g.shape[0] == (8 if n == len(grads) - 1 else 16)
        assert all(float(part.abs().sum()) > 0 for part in halves), n


def test_pixelcnn_old_state_is_refused_by_name():
    """A state of the masked decoder before issue 15 (its embed.* entries) fails with a message
    that says so, as a CheckpointError through checkpoint.load_state."""
    from acn_kernels.acn.checkpoint import CheckpointError, load_state

    model = build_model("vae", num_codes=10, image_shape=SHAPE, decoder="pixelcnn", code_dim=3)
    state = model.state_dict()
    state["decoder.embed.weight"], state["decoder.embed.bias"] = torch.zeros(32, 1, 1, 1), torch.zeros(32)
    with pytest.raises(RuntimeError, match=r"PixelCNN decoder before issue 15.*decoder\.embed\.\* entries"):
        model.load_state_dict(state)
    with pytest.raises(CheckpointError, match=r"old\.pt: the model state does not fit.*before issue 15"):
        load_state(model, state, "old.pt: the model state")
    del state["decoder.embed.weight"], state["decoder.embed.bias"]
    model.load_state_dict(state)  # today's state loads


@pytest.mark.parametrize(("name", "value"), [("channels", 0), ("layers", 0), ("layers", 2.0), ("channels", True)])
def test_pixelcnn_sizes_checked(name, value):
    with pytest.raises(ValueError, match=f"PixelCNNDecoder {name} must be an integer >= 1"):
        PixelCNNDecoder(3, SHAPE, **{name: value})


def test_pixelcnn_first_layer_folds_its_embedding():
    """The first layer's convolutions of the image equal the convolutions of its embedding (the
    padded image embedded, then convolved), computed in float64."""
    torch.manual_seed(0)
    layer = PixelCNNDecoder(3, (2, 8, 8), channels=4, layers=2).layers[0].double()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64) * 10 + 5
    for conv, pad in ((layer.v, layer.v_pad), (layer.h, layer.h_pad)):
        padded = torch.nn.functional.pad(x, pad)
        torch.testing.assert_close(layer._conv(conv, padded), conv(layer.embed(padded)), rtol=1e-12, atol=1e-10)
