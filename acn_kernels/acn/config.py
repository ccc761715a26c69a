"""The configuration of a training run: :class:`TrainConfig`."""

from __future__ import annotations

import dataclasses

import torch

from .models import ACN, VAE, build_model


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run. Model: ``model`` ("acn" | "vae"), ``encoder`` ("mlp" |
    "conv"), ``decoder`` ("mlp" | "conv" | "pixelcnn"), ``code_dim`` (16), ``k`` (5),
    ``components`` (3). Optimisation: ``batch_size`` (128), ``lr`` (Adam, 1e-3), ``seed`` (0).
    Budget, whichever ends first: ``epochs`` and ``steps`` (totals over the run, resumes
    included), ``minutes`` (wall clock of this invocation). ``checkpoint_every``: steps between
    mid-pass checkpoints (0 = only at pass ends and at the end)."""

    model: str = "acn"
    encoder: str = "mlp"
    decoder: str = "mlp"
    data: str = "mnist5k"
    code_dim: int = 16
    k: int = 5
    components: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    epochs: int | None = None
    steps: int | None = None
    minutes: float | None = 3.0
    checkpoint_every: int = 500
    device: str = "cpu"

    def build(self, num_train: int, image_shape: tuple[int, int, int]) -> ACN | VAE:
        """The model this config describes, initialised from ``seed``."""
        torch.manual_seed(self.seed)
        return build_model(self.model, num_codes=num_train, image_shape=image_shape, encoder=self.encoder,
                           decoder=self.decoder, code_dim=self.code_dim, k=self.k,
                           components=self.components, seed=self.seed)


__all__ = ["TrainConfig"]
