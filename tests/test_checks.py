"""The argument checks shared by every backend (acn_kernels.checks): what they accept and how
their errors name the argument (the per-op bad-input tables live in the op test files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import acn_kernels
from acn_kernels import checks


@pytest.mark.parametrize("k", [3, np.int64(3), np.int32(3), torch.tensor(3)])
def test_k_accepts_any_integer(k):
    """As torch.topk does: numpy integers and 0-dim integer tensors are integers."""
    out = acn_kernels.masked_topk(torch.randn(2, 4), torch.randn(9, 4), k, backend="torch")
    assert out.indices.shape == (2, 3)
    assert checks.check_k(k, 9) == 3 and type(checks.check_k(k, 9)) is int


@pytest.mark.parametrize("k", [True, 3.0, np.float64(3), torch.tensor([3]), torch.tensor(3.0), "3"])
def test_k_rejects_non_integers(k):
    with pytest.raises(TypeError, match="k must be an int"):
        checks.check_k(k, 9)


def test_exclude_mask_error_is_short():
    """A list passed as the mask is described by its type, not echoed element by element."""
    with pytest.raises(TypeError, match=r"exclude_mask must be a bool tensor, got list$"):
        acn_kernels.masked_topk(torch.randn(2, 4), torch.randn(1000, 4), 3, exclude_mask=[False] * 1000)
    with pytest.raises(TypeError, match=r"got a int64 tensor of shape \(1000,\)"):
        acn_kernels.masked_topk(torch.randn(2, 4), torch.randn(1000, 4), 3,
                                exclude_mask=torch.zeros(1000, dtype=torch.int64))


def test_acn_kl_requires_the_code():
    """acn_kl(z, None, ...) used to return log p(z) without a word."""
    z, p = torch.randn(2, 3), torch.randn(2, 3, 2)
    with pytest.raises(TypeError, match="code must be a"):
        acn_kernels.acn_kl(z, None, p, p, p)


def test_backend_errors_list_every_backend():
    z, p = torch.randn(2, 3), torch.randn(2, 3, 2)
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run.*Every backend: cpu: .*cuda: .*triton: "
                                           r".*torch: ok"):
        acn_kernels.mixture_log_prob(z, p, p, p, backend="cuda")
