"""The ACN layer: the model, its code bank, training, evaluation and the command line, built on
the kernel layer (:mod:`acn_kernels.ops`, :mod:`acn_kernels.nn`), which never imports it."""

from .bank import CodeBank, Neighbours, PassOverrunWarning
from .indexed import IndexedDataset
from .models import ACN, VAE
from .prior import MixturePrior

__all__ = ["ACN", "VAE", "CodeBank", "IndexedDataset", "MixturePrior", "Neighbours", "PassOverrunWarning"]
