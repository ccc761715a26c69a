"""The drop-in modules over the ops (acn_kernels.nn): KNNLayer and MixtureNLLLoss."""

from __future__ import annotations

import pytest
import torch
from testing import backend_params

import acn_kernels
from acn_kernels import KNNLayer, MixtureNLLLoss

BACKENDS = backend_params(include_torch=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_knn_layer_matches_masked_topk(backend, device):
    g = torch.Generator().manual_seed(8)
    bank = torch.randn(120, 6, generator=g)
    layer = KNNLayer(bank, k=4, backend=backend).to(device)
    assert "bank" in layer.state_dict() and layer.bank.device.type == device
    assert "k=4" in repr(layer)
    q = torch.randn(5, 6, generator=g).to(device).requires_grad_()
    mask = (torch.arange(120) < 10).to(device)
    excl = torch.tensor([20, -1, 30, 40, 50]).to(device)
    out = layer(q, exclude_mask=mask, exclude_index=excl)
    assert isinstance(out, acn_kernels.MaskedTopK)
    want = acn_kernels.masked_topk(q, layer.bank, 4, exclude_mask=mask, exclude_index=excl, backend="torch")
    assert torch.equal(out.indices.cpu(), want.indices.cpu())
    torch.testing.assert_close(out.dists, want.dists)
    assert not (out.indices < 10).any() and not (out.indices == excl.unsqueeze(1)).any()
    (gq,) = torch.autograd.grad(out.dists.sum(), q)
    torch.testing.assert_close(gq, 2 * (4 * q - layer.bank[out.indices].sum(1)).detach())
    assert layer(q.detach(), k=7).indices.shape == (5, 7)  # k per call


def test_knn_layer_shares_the_callers_bank():
    """No hidden copy: an in-place write into the caller's tensor is what the next search sees."""
    bank = torch.randn(50, 3)
    layer = KNNLayer(bank, k=1, backend="torch")
    q = torch.full((1, 3), 100.0)
    assert layer(q).indices.item() != 7
    bank[7] = 100.0
    assert layer(q).indices.item() == 7 and layer(q).dists.item() == 0.0
    bigger = torch.cat([bank, torch.full((1, 3), -100.0)])
    layer.update(bigger)
    assert layer(-q).indices.item() == 50 and "bank=(51, 3)" in repr(layer)


def test_knn_layer_bad_arguments():
    with pytest.raises(ValueError, match="bank must be a"):
        KNNLayer(torch.randn(5), k=1)
    with pytest.raises(TypeError, match="bank must be a floating-point"):
        KNNLayer(torch.zeros(5, 2, dtype=torch.int64), k=1)
    with pytest.raises(ValueError, match="larger than the bank"):
        KNNLayer(torch.randn(5, 2), k=6)
    layer = KNNLayer(torch.randn(5, 2), k=2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        layer(torch.randn(1, 2), k=0)
    with pytest.raises(TypeError, match="bank must be a torch.Tensor"):
        layer.update([[1.0, 2.0]])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mixture_nll_loss(reduction):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 5, generator=g)
    p = [torch.randn(4, 5, 3, generator=g) for _ in range(3)]
    nll = -acn_kernels.mixture_log_prob(z, *p, backend="torch")
    want = {"mean": nll.mean(), "sum": nll.sum(), "none": nll}[reduction]
    torch.testing.assert_close(MixtureNLLLoss(reduction, backend="torch")(z, *p), want)
    with pytest.raises(ValueError, match="reduction must be"):
        MixtureNLLLoss("avg")
