"""The configuration of a training run: :class:`TrainConfig`."""

from __future__ import annotations

import dataclasses
import math

import torch

from ..ops import MAX_K
from .data import ImageData, load
from .likelihood import LIKELIHOODS
from .models import ACN, VAE, build_model


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run. Model: ``model`` ("acn" | "vae"), ``encoder`` ("mlp" |
    "conv"), ``decoder`` ("mlp" | "conv" | "pixelcnn"), ``code_dim`` (16), ``k`` (5),
    ``components`` (3), ``likelihood`` ("bernoulli", binarised images | "logistic" | "categorical",
    8-bit images) and ``logistic_components`` (5). Optimisation: ``batch_size`` (128), ``lr``
    (Adam, 1e-3), ``seed`` (0).
    Budget, whichever ends first: ``epochs`` and ``steps`` (totals over the run, resumes
    included), ``minutes`` (wall clock of this invocation). ``checkpoint_every``: steps between
    mid-pass checkpoints (0 = only at pass ends and at the end).
    ``capturable`` (False): an ACN's bank resolves each batch with fixed work and, on a GPU,
    without a host synchronisation (:class:`~acn_kernels.CodeBank`'s ``capturable``; batches of at
    most ``MAX_K - k + 1``); the loop then reads the device only where it logs, checkpoints and
    ends a pass, and raises there any argument error the bank found on the device. The same
    picks and weights as without it; a VAE has no bank and trains as without it."""

    model: str = "acn"
    encoder: str = "mlp"
    decoder: str = "mlp"
    data: str = "mnist5k"
    code_dim: int = 16
    k: int = 5
    components: int = 3
    likelihood: str = "bernoulli"
    logistic_components: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    epochs: int | None = None
    steps: int | None = None
    minutes: float | None = 3.0
    checkpoint_every: int = 500
    device: str = "cpu"
    capturable: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first field out of range: integers (not bools) ``code_dim``,
        ``k``, ``components``, ``batch_size`` >= 1, ``checkpoint_every``, ``seed`` >= 0,
        ``epochs`` and ``steps`` None or >= 0; ``lr`` finite > 0, ``minutes`` None or finite >= 0;
        ``capturable`` a bool, and for an ACN only with ``batch_size`` <= ``MAX_K - k + 1`` (one
        search of K + B - 1 candidates per batch)."""
        def integer(name: str, low: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {low}"
                                 f"{' or None' if optional else ''}, got {v!r}")

        def number(name: str, positive: bool, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0
                    or (positive and v == 0)):
                raise ValueError(f"TrainConfig.{name} must be a finite number {'> 0' if positive else '>= 0'}"
                                 f"{' or None' if optional else ''}, got {v!r}")

        for name in ("code_dim", "k", "components", "batch_size", "logistic_components"):
            integer(name, 1)
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"TrainConfig.likelihood must be one of {sorted(LIKELIHOODS)}, got {self.likelihood!r}")
        integer("checkpoint_every", 0)
        integer("seed", 0)
        integer("epochs", 0, optional=True)
        integer("steps", 0, optional=True)
        number("lr", positive=True)
        number("minutes", positive=False, optional=True)
        if not isinstance(self.capturable, bool):
            raise ValueError(f"TrainConfig.capturable must be a bool, got {self.capturable!r}")
        if self.capturable and self.model == "acn" and self.batch_size > MAX_K - self.k + 1:
            raise ValueError(f"TrainConfig.capturable resolves a batch in one search of K + B - 1 candidates, so "
                             f"batch_size must be <= MAX_K - k + 1 = {MAX_K - self.k + 1}, got {self.batch_size}")

    def build(self, num_train: int, image_shape: tuple[int, int, int]) -> ACN | VAE:
        """The model this config describes, initialised from ``seed`` (an ACN's bank
        ``capturable`` as this config)."""
        torch.manual_seed(self.seed)
        model = build_model(self.model, num_codes=num_train, image_shape=image_shape, encoder=self.encoder,
                            decoder=self.decoder, code_dim=self.code_dim, k=self.k,
                            components=self.components, seed=self.seed, likelihood=self.likelihood,
                            logistic_components=self.logistic_components)
        if isinstance(model, ACN):
            model.bank.capturable = bool(self.capturable)
        return model

    def load_data(self) -> ImageData:
        """``data`` on the grid the likelihood models (binarised for "bernoulli", 8-bit otherwise)."""
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {sorted(LIKELIHOODS)}, got {self.likelihood!r}")
        return load(self.data, levels=LIKELIHOODS[self.likelihood].levels)


__all__ = ["TrainConfig"]
