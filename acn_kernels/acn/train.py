"""The ACN training loop (see :func:`train`; the command line is :mod:`acn_kernels.acn.cli`).

The loop, in short::

    for each pass p:                                   # model.pass_index
        order = rng.permutation(seed, p, N)            # counter-based: no RNG state to carry
        for each batch idx of order:
            terms = model(x[idx], idx)                 # bank update + neighbours + fused KL + recon
            terms.loss.mean().backward(); adam.step()
        model.new_pass()                               # clears the bank's used mask

Checkpoints (``<out>/checkpoint.pt``, format: :mod:`acn_kernels.acn.checkpoint`) are written at
the end of every pass, every ``checkpoint_every`` steps and when the budget runs out, atomically,
so a killed run always leaves the previous checkpoint whole.

A resumed run (``--resume``) continues bit-for-bit where the checkpoint stopped, mid-pass too: on
CPU it produces the same weights as an uninterrupted run with the same ``--steps``/``--epochs``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import torch
from torch import nn

from . import rng
from .checkpoint import CHECKPOINT, FORMAT_VERSION, atomic_save, atomic_write_text
from .config import TrainConfig
from .data import ImageData
from .evaluate import heldout_terms
from .models import ACN, VAE

PLOT_SECONDS = 30.0
"""metrics.png is redrawn after a pass at most this often (drawing takes about a second), and
always when training stops; metrics.json is rewritten after every pass."""


def plot_history(history: list[dict[str, float]], path: str) -> None:
    """Loss, KL and reconstruction nats per pass (train and held out) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key in zip(axes, ("loss", "kl", "recon"), strict=True):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], label="train")
        if history and f"test_{key}" in history[0]:
            ax.plot(epochs, [h[f"test_{key}"] for h in history], label="held out")
        ax.set_title(f"{key} (nats / image)")
        ax.set_xlabel("pass")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class _Position:
    pass_index: int
    order: torch.Tensor
    offset: int = 0
    step: int = 0
    sums: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(4, dtype=torch.float64))
    elapsed: float = 0.0


def _checkpoint(config: TrainConfig, model: nn.Module, opt: torch.optim.Optimizer, pos: _Position,
                history: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(config),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "position": {"pass_index": pos.pass_index, "order": pos.order.cpu(), "offset": pos.offset,
                     "step": pos.step, "sums": pos.sums.clone(), "elapsed": pos.elapsed},
        "rng": {"seed": config.seed, "torch": torch.get_rng_state()},
        "history": history,
    }


def train(
    model: ACN | VAE,
    data: ImageData,
    config: TrainConfig,
    out_dir: str | None = None,
    *,
    resume: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``model`` on ``data.train_x`` with Adam until the budget in ``config`` runs out.

    Args:
        model: an :class:`~acn_kernels.ACN` (its bank sized to the training set) or a
            :class:`~acn_kernels.VAE`, on ``config.device``.
        data: binarised images; ``data.test_x`` gives held-out metrics after each pass.
        config: batch size, learning rate, seed, budget, checkpoint interval.
        out_dir: where checkpoint.pt, metrics.json (after every pass) and metrics.png (see
            :data:`PLOT_SECONDS`) go (None: nowhere).
        resume: a checkpoint dict (:func:`load_checkpoint`) to continue from; model and
            optimiser state, pass position and history are restored from it.
        progress: show a tqdm bar with the running loss, KL and reconstruction nats of the pass.

    Returns:
        The per-pass metrics (loss, kl, recon per image, train and held out, in nats).
    """
    from tqdm.auto import tqdm

    device = torch.device(config.device)
    x = data.train_x.to(device)
    n = x.shape[0]
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    history: list[dict[str, float]] = []
    if resume is None:
        pos = _Position(model.pass_index, rng.permutation(config.seed, model.pass_index, n, device))
    else:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"]["torch"])
        p = resume["position"]
        pos = _Position(p["pass_index"], p["order"].to(device), p["offset"], p["step"], p["sums"].clone(),
                        p["elapsed"])
        history = list(resume["history"])
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)

    def save() -> None:
        if out_dir is not None:
            atomic_save(_checkpoint(config, model, opt, pos, history), os.path.join(out_dir, CHECKPOINT))

    start = time.monotonic()
    elapsed0 = pos.elapsed

    def budget_left() -> bool:
        pos.elapsed = elapsed0 + time.monotonic() - start
        return not ((config.epochs is not None and len(history) >= config.epochs)
                    or (config.steps is not None and pos.step >= config.steps)
                    or (config.minutes is not None and pos.elapsed - elapsed0 >= 60 * config.minutes))

    per_pass = math.ceil(n / config.batch_size)
    total = config.steps
    if config.epochs is not None:
        total = min(total or 1 << 62, config.epochs * per_pass)
    bar = tqdm(total=total, initial=pos.step, disable=not progress, unit="step", dynamic_ncols=True)
    saved_at = pos.step
    plotted_at = -math.inf
    model.train()
    while budget_left():
        idx = pos.order[pos.offset : pos.offset + config.batch_size]
        terms = model(x[idx], idx)
        opt.zero_grad(set_to_none=True)
        terms.loss.mean().backward()
        opt.step()

        pos.offset += idx.numel()
        pos.step += 1
        pos.sums += torch.stack([torch.tensor(float(idx.numel())), terms.loss.detach().sum().cpu(),
                                 terms.kl.detach().sum().cpu(), terms.recon.detach().sum().cpu()]).double()
        bar.update(1)
        if pos.step % 10 == 0 or pos.offset == n:
            loss, kl, recon = (pos.sums[1:] / pos.sums[0]).tolist()
            bar.set_postfix(epoch=len(history) + 1, loss=f"{loss:.2f}", kl=f"{kl:.2f}", recon=f"{recon:.2f}")

        if pos.offset == n:  # end of the pass
            loss, kl, recon = (pos.sums[1:] / pos.sums[0]).tolist()
            row = {"epoch": len(history) + 1, "step": pos.step, "train_loss": loss, "train_kl": kl,
                   "train_recon": recon, **heldout_terms(model, data.test_x, device=device),
                   "elapsed_s": elapsed0 + time.monotonic() - start}
            if isinstance(model, ACN):
                row["fallbacks"] = model.bank.fallbacks
            history.append(row)
            model.new_pass()
            pos.pass_index = model.pass_index
            pos.order = rng.permutation(config.seed, pos.pass_index, n, device)
            pos.offset, pos.sums = 0, torch.zeros(4, dtype=torch.float64)
            if out_dir is not None:
                atomic_write_text(json.dumps({"history": history}, indent=1),
                                  os.path.join(out_dir, "metrics.json"))
                if time.monotonic() - plotted_at >= PLOT_SECONDS:
                    plot_history(history, os.path.join(out_dir, "metrics.png"))
                    plotted_at = time.monotonic()
            save()
            saved_at = pos.step
        elif config.checkpoint_every and pos.step % config.checkpoint_every == 0:
            save()
            saved_at = pos.step
    bar.close()
    if saved_at != pos.step:
        save()
    if out_dir is not None and history:
        plot_history(history, os.path.join(out_dir, "metrics.png"))
    return history


__all__ = ["PLOT_SECONDS", "plot_history", "train"]
