"""acn-kernels: fused kernels for Associative Compression Networks in PyTorch.

Public ops: :func:`masked_topk`, :func:`mixture_log_prob`, :func:`acn_kl` (and for one Gaussian
per dimension, :func:`as_mixture` and the closed-form :func:`gaussian_kl`); :func:`backends` says
which backends ("cpu", "cuda", "triton", "torch") can run here; :data:`MAX_K` is the largest k.
"""

from . import _ext  # noqa: F401  (loads _C, registering the C++ ops, or warns once)
from .acn import ACN, VAE, CodeBank, MixturePrior, Neighbours
from .dispatch import backends
from .gaussian import as_mixture, gaussian_kl
from .nn import KNNLayer, MixtureNLLLoss
from .ops import MAX_K, MaskedTopK, acn_kl, masked_topk, mixture_log_prob

__version__ = "0.1.0"

__all__ = [
    "ACN",
    "MAX_K",
    "VAE",
    "CodeBank",
    "MixturePrior",
    "Neighbours",
    "KNNLayer",
    "MaskedTopK",
    "MixtureNLLLoss",
    "acn_kl",
    "as_mixture",
    "backends",
    "gaussian_kl",
    "masked_topk",
    "mixture_log_prob",
]
