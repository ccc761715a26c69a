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
from .checkpoint import CHECKPOINT, atomic_write, build_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import ImageData
from .evaluate import heldout_terms
from .models import ACN, VAE

PLOT_SECONDS = 30.0
"""metrics.png is redrawn after a pass at most this often (drawing takes about a second), and
when training stops if it is out of date; metrics.json is rewritten after every pass."""


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
# Where the processes of a run differ


class Runtime:
    """How the processes of a run share it; this one is a single process.

    :func:`train` is one loop for every number of processes: it calls these methods where a
    distributed run differs, and :class:`acn_kernels.acn.distributed.DistributedRuntime`
    implements them over torch.distributed (DDP, slices of the global batch, agreement on
    failures and on the time budget, sums over the ranks, the gathered bank, rank-0 writes).
    """

    rank = 0
    world_size = 1

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files and shows its progress (rank 0)."""
        return self.rank == 0

    def prepare(self, model: ACN | VAE) -> ACN | VAE:
        """The model as this process trains it (a distributed run shards an ACN's bank)."""
        return model

    def wrap(self, model: ACN | VAE) -> nn.Module:
        """What the loop calls forward on (a distributed run: DistributedDataParallel)."""
        return model

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's examples [b] int64 of a global batch [G] int64."""
        return batch

    def agree(self, error: BaseException | None, late: bool) -> bool:
        """Called by every process after each forward pass: re-raises this process's ``error``
        (a distributed run tells its peers first, and raises PeerFailure for theirs), else
        returns whether to stop after this step, which is rank 0's ``late`` (one clock decides)."""
        if error is not None:
            raise error
        return late

    def total(self, sums: torch.Tensor) -> torch.Tensor:
        """``sums`` [4] float64 added over the processes (on the CPU)."""
        return sums

    def share(self, sums: torch.Tensor) -> torch.Tensor:
        """This process's share of a resumed run's sums [4] (all of them on rank 0)."""
        return sums.clone() if self.rank == 0 else torch.zeros_like(sums)

    def whole(self, model: ACN | VAE) -> ACN | VAE | None:
        """Called by every process: the model with its whole code bank on the writing process (for
        checkpoints and held-out metrics), None on the others."""
        return model


# ------------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class Position:
    """Where a run stands: the pass, its example order [N] int64, how many of them are done, the
    optimiser steps, this process's running sums of the pass ([4] float64: examples, loss, KL,
    reconstruction nats), and the seconds trained so far."""

    pass_index: int
    order: torch.Tensor
    offset: int = 0
    step: int = 0
    sums: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(4, dtype=torch.float64))
    elapsed: float = 0.0

    def state(self, sums: torch.Tensor) -> dict[str, Any]:
        """The checkpoint's ``position``, holding ``sums`` (the run's, over every process)."""
        return {"pass_index": self.pass_index, "order": self.order.cpu(), "offset": self.offset,
                "step": self.step, "sums": sums.clone(), "elapsed": self.elapsed}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> Position:
        return cls(state["pass_index"], state["order"].to(device), state["offset"], state["step"],
                   state["sums"].clone(), state["elapsed"])


def train(
    model: ACN | VAE,
    data: ImageData,
    config: TrainConfig,
    out_dir: str | None = None,
    *,
    resume: dict[str, Any] | None = None,
    progress: bool = True,
    runtime: Runtime | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` on ``data.train_x`` with Adam until the budget in ``config`` runs out.

    Args:
        model: an :class:`~acn_kernels.ACN` (its bank sized to the training set) or a
            :class:`~acn_kernels.VAE`, on ``config.device`` (in a distributed run, on every rank,
            after ``runtime.prepare``).
        data: binarised images; ``data.test_x`` gives held-out metrics after each pass.
        config: batch size (the global batch), learning rate, seed, budget, checkpoint interval.
        out_dir: where checkpoint.pt, metrics.json (after every pass) and metrics.png (see
            :data:`PLOT_SECONDS`) go (None: nowhere).
        resume: a checkpoint dict (:func:`~acn_kernels.acn.checkpoint.load_checkpoint`) to
            continue from; model and optimiser state, torch's RNG state, pass position and history
            are restored from it.
        progress: show a tqdm bar with the running loss, KL and reconstruction nats of the pass.
        runtime: :class:`Runtime` (the default: one process) or a
            :class:`~acn_kernels.acn.distributed.DistributedRuntime`.

    Each step takes the next ``batch_size`` examples of the pass's order (every process its
    slice), and the loss is the batch's sum divided by the global batch size (times the number of
    processes, whose gradients DDP averages), so the gradients are those of the global batch's
    mean loss. The time budget is checked after each forward pass.

    Returns:
        The per-pass metrics (loss, kl, recon per image, train and held out, in nats; the held-out
        ones on the writing process only).
    """
    from tqdm.auto import tqdm

    runtime = Runtime() if runtime is None else runtime
    device = torch.device(config.device)
    x = data.train_x.to(device)
    n = x.shape[0]
    net = runtime.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    history: list[dict[str, float]] = []
    if resume is None:
        pos = Position(model.pass_index, rng.permutation(config.seed, model.pass_index, n, device))
    else:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"]["torch"])
        pos = Position.from_state(resume["position"], device)
        pos.sums = runtime.share(pos.sums)
        history = list(resume["history"])
    writes = out_dir is not None and runtime.writes
    if writes:
        os.makedirs(out_dir, exist_ok=True)

    def save(whole: ACN | VAE | None) -> None:
        """Every process calls it (the sums are collective); ``whole``: runtime.whole(model)."""
        sums = runtime.total(pos.sums)
        if writes:
            ckpt = build_checkpoint(config, whole.state_dict(), opt.state_dict(), pos.state(sums), history,
                                    world_size=runtime.world_size)
            save_checkpoint(ckpt, os.path.join(out_dir, CHECKPOINT))

    def out_of_steps() -> bool:
        return ((config.epochs is not None and len(history) >= config.epochs)
                or (config.steps is not None and pos.step >= config.steps))

    start, elapsed0 = time.monotonic(), pos.elapsed
    total = config.steps
    if config.epochs is not None:
        total = min(total or 1 << 62, config.epochs * math.ceil(n / config.batch_size))
    bar = tqdm(total=total, initial=pos.step, disable=not (progress and runtime.writes), unit="step",
               dynamic_ncols=True)
    saved_at, plotted_at, plotted_passes = pos.step, -math.inf, len(history)
    model.train()
    stop = out_of_steps()
    while not stop:
        batch = pos.order[pos.offset : pos.offset + config.batch_size]
        idx = runtime.local(batch)
        error = None
        try:
            terms = net(x[idx], idx)
        except Exception as e:  # the runtime tells the other processes, then re-raises it
            error = e
        pos.elapsed = elapsed0 + time.monotonic() - start
        late = config.minutes is not None and pos.elapsed - elapsed0 >= 60 * config.minutes
        time_up = runtime.agree(error, late)
        opt.zero_grad(set_to_none=True)
        (terms.loss.sum() * runtime.world_size / batch.numel()).backward()
        opt.step()

        pos.offset += batch.numel()
        pos.step += 1
        pos.sums += torch.stack([torch.tensor(float(idx.numel())), terms.loss.detach().sum().cpu(),
                                 terms.kl.detach().sum().cpu(), terms.recon.detach().sum().cpu()]).double()
        bar.update(1)
        if pos.step % 10 == 0 and pos.sums[0] > 0:
            loss, kl, recon = (pos.sums[1:] / pos.sums[0]).tolist()
            bar.set_postfix(epoch=len(history) + 1, loss=f"{loss:.2f}", kl=f"{kl:.2f}", recon=f"{recon:.2f}")

        if pos.offset == n:  # end of the pass
            sums = runtime.total(pos.sums)
            loss, kl, recon = (sums[1:] / sums[0]).tolist()
            row = {"epoch": len(history) + 1, "step": pos.step, "train_loss": loss, "train_kl": kl,
                   "train_recon": recon}
            model.new_pass()
            whole = runtime.whole(model)
            if whole is not None:
                row.update(heldout_terms(whole, data.test_x, device=device))
            if isinstance(model, ACN):
                row["fallbacks"] = model.bank.fallbacks
            row["elapsed_s"] = elapsed0 + time.monotonic() - start
            history.append(row)
            bar.set_postfix(epoch=row["epoch"], loss=f"{loss:.2f}", kl=f"{kl:.2f}", recon=f"{recon:.2f}")
            pos.pass_index = model.pass_index
            pos.order = rng.permutation(config.seed, pos.pass_index, n, device)
            pos.offset, pos.sums = 0, torch.zeros(4, dtype=torch.float64)
            if writes:
                atomic_write(os.path.join(out_dir, "metrics.json"), json.dumps({"history": history}, indent=1))
                if time.monotonic() - plotted_at >= PLOT_SECONDS:
                    plot_history(history, os.path.join(out_dir, "metrics.png"))
                    plotted_at, plotted_passes = time.monotonic(), len(history)
            if out_dir is not None:
                save(whole)
            saved_at = pos.step
        elif out_dir is not None and config.checkpoint_every and pos.step % config.checkpoint_every == 0:
            save(runtime.whole(model))
            saved_at = pos.step
        stop = time_up or out_of_steps()
    bar.close()
    if out_dir is not None and saved_at != pos.step:
        save(runtime.whole(model))
    if writes and len(history) != plotted_passes:
        plot_history(history, os.path.join(out_dir, "metrics.png"))
    return history


__all__ = ["PLOT_SECONDS", "Position", "Runtime", "plot_history", "train"]
