"""Sampling and evaluation: image grids, held-out compression, representation quality (the
work of ``acn-eval``, :func:`acn_kernels.acn.cli.eval_main`).

- :func:`heldout_terms`: KL (coding cost) and reconstruction nats per held-out image. For an ACN
  a held-out code's prior is conditioned on a neighbour drawn from the *training* bank: the K
  nearest bank rows with **no used mask** (held-out examples are not part of the pass), one
  picked by a counter-based uniform; eps is counter-based too, so the numbers are reproducible.
- :func:`representation`: linear-probe and k-NN accuracy of codes on held-out data, fitted on the
  training codes (scikit-learn); :func:`baselines` does the same for raw pixels and PCA.
- :func:`write_report`: reconstructions.png, daydreams.png (ACN), neighbours.png, and a summary.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ..ops import masked_topk
from . import rng
from .data import ImageData
from .models import ACN, VAE
from .networks import decode_sample


@torch.no_grad()
def encode_all(model: ACN | VAE, x: torch.Tensor, *, device: str | torch.device = "cpu",
               batch: int = 500) -> torch.Tensor:
    """Codes [N, D] float32 (on ``device``) of images x [N, C, H, W], in batches."""
    return torch.cat([model.encode(x[s : s + batch].to(device)).float() for s in range(0, x.shape[0], batch)])


@torch.no_grad()
def heldout_terms(model: ACN | VAE, x: torch.Tensor, *, device: str | torch.device = "cpu",
                  batch: int = 500) -> dict[str, float]:
    """Mean held-out loss, KL and reconstruction nats per image: {"test_loss", "test_kl",
    "test_recon"}. Draws are counter-based (pass 0 of the evaluation streams, example index =
    position in x), so repeated calls agree."""
    sums = torch.zeros(3, dtype=torch.float64)
    for s in range(0, x.shape[0], batch):
        xb = x[s : s + batch].to(device)
        idx = torch.arange(s, s + xb.shape[0], device=device)
        code = model.encode(xb)
        if isinstance(model, ACN):
            bank = model.bank
            cand = bank.search(code).indices  # no used mask: held-out codes are not in the pass
            n_valid = (cand >= 0).sum(1)
            u = rng.uniform(bank.seed, rng.EVAL_NEIGHBOUR, 0, idx)
            pick = cand.gather(1, (u * n_valid).long().unsqueeze(1)).squeeze(1)
            eps = rng.normal(bank.seed, rng.EVAL_EPS, 0, idx, code.shape[1], code.dtype)
            terms = model.terms(xb, code, bank.codes[pick].to(code.dtype), eps)
        else:
            eps = rng.normal(model.seed, rng.EVAL_EPS, 0, idx, code.shape[1], code.dtype)
            terms = model.terms(xb, code, eps)
        sums += torch.stack([terms.loss.sum(), terms.kl.sum(), terms.recon.sum()]).double().cpu()
    loss, kl, recon = (sums / x.shape[0]).tolist()
    return {"test_loss": loss, "test_kl": kl, "test_recon": recon}


def representation(train_feats: np.ndarray, train_y: np.ndarray, test_feats: np.ndarray,
                   test_y: np.ndarray, *, k: int = 5) -> dict[str, float]:
    """Held-out accuracy of a linear probe (standardised features, logistic regression) and of a
    k-NN classifier (Euclidean, k neighbours), both fitted on the training features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train_feats, train_y)
    knn = KNeighborsClassifier(n_neighbors=k).fit(train_feats, train_y)
    return {"linear_probe": float(probe.score(test_feats, test_y)),
            "knn": float(knn.score(test_feats, test_y))}


def baselines(data: ImageData, pca_dim: int = 16) -> dict[str, dict[str, float]]:
    """:func:`representation` of raw pixels and of a ``pca_dim``-component PCA of them."""
    from sklearn.decomposition import PCA

    tr, te = data.train_x.flatten(1).numpy(), data.test_x.flatten(1).numpy()
    ytr, yte = data.train_y.numpy(), data.test_y.numpy()
    pca = PCA(n_components=pca_dim, random_state=0).fit(tr)
    return {"pixels": representation(tr, ytr, te, yte),
            f"pca{pca_dim}": representation(pca.transform(tr), ytr, pca.transform(te), yte)}


# ------------------------------------------------------------------------------------------------
# Image grids


def save_grid(images: torch.Tensor, path: str) -> None:
    """Write images [R, C, channels, H, W] (values in [0, 1]) as one PNG grid of R rows and C
    columns, 2-pixel gaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, c, ch, h, w = images.shape
    grid = torch.full((ch, r * (h + 2) + 2, c * (w + 2) + 2), 0.5)
    for i in range(r):
        for j in range(c):
            top, left = 2 + i * (h + 2), 2 + j * (w + 2)
            grid[:, top : top + h, left : left + w] = images[i, j].float().cpu()
    arr = grid[0].numpy() if ch == 1 else grid.permute(1, 2, 0).numpy()
    plt.imsave(path, np.clip(arr, 0, 1), cmap="gray" if ch == 1 else None, vmin=0, vmax=1)


@torch.no_grad()
def reconstructions(
    model: ACN | VAE, x: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[2, B, C, H, W]: the images and their reconstructions from the posterior mean z = code
    (pixel probabilities; binary samples for an autoregressive decoder)."""
    return torch.stack([x, decode_sample(model.decoder, model.encode(x), generator, mean=True)])


@torch.no_grad()
def neighbour_grid(model: ACN | VAE, query_x: torch.Tensor, train_x: torch.Tensor, k: int = 8, *,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """[B, 1 + k, C, H, W]: each query image, then its k nearest training images in code space
    (fresh codes of the training images, by masked_topk)."""
    bank = encode_all(model, train_x, device=device)
    rows = masked_topk(encode_all(model, query_x, device=device), bank, k).indices.cpu()
    return torch.cat([query_x.cpu().unsqueeze(1), train_x.cpu()[rows]], 1)


def write_report(
    model: ACN | VAE,
    data: ImageData,
    out_dir: str,
    *,
    seed: int = 0,
    grids: bool = True,
    device: str | torch.device = "cpu",
    daydream_steps: int = 10,
    rows: int = 8,
) -> dict[str, Any]:
    """Write reconstructions.png, daydreams.png (ACN only) and neighbours.png into ``out_dir``
    (when ``grids``) and return {"heldout": :func:`heldout_terms`, "representation":
    :func:`representation` of the codes (when the data has labels)}."""
    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    summary: dict[str, Any] = {"heldout": heldout_terms(model, data.test_x, device=device)}
    if data.train_y is not None and data.test_y is not None:
        tr = encode_all(model, data.train_x, device=device).cpu().numpy()
        te = encode_all(model, data.test_x, device=device).cpu().numpy()
        summary["representation"] = representation(tr, data.train_y.numpy(), te, data.test_y.numpy())
    if grids:
        gen = torch.Generator(device=device).manual_seed(seed)
        x = data.test_x[:rows].to(device)
        rec = reconstructions(model, x, gen)
        save_grid(rec.cpu(), os.path.join(out_dir, "reconstructions.png"))
        if isinstance(model, ACN):
            dream = model.daydream(x, daydream_steps, gen)  # [steps + 1, B, ...]
            save_grid(dream.transpose(0, 1).cpu(), os.path.join(out_dir, "daydreams.png"))
        save_grid(neighbour_grid(model, data.test_x[:rows], data.train_x, device=device),
                  os.path.join(out_dir, "neighbours.png"))
    model.train()
    return summary


__all__ = ["baselines", "encode_all", "heldout_terms", "neighbour_grid", "reconstructions", "representation",
           "save_grid", "write_report"]
