"""The standard ACN training loop and the ``acn-train`` command (also ``python -m acn_kernels.acn.train``).

The loop, in short (see :func:`train`)::

    for each pass p:                                   # model.pass_index
        order = rng.permutation(seed, p, N)            # counter-based: no RNG state to carry
        for each batch idx of order:
            terms = model(x[idx], idx)                 # bank update + neighbours + fused KL + recon
            terms.loss.mean().backward(); adam.step()
        model.new_pass()                               # clears the bank's used mask

Checkpoints (``<out>/checkpoint.pt``) are written at the end of every pass, every
``checkpoint_every`` steps and when the budget runs out, atomically (a temporary file in the same
folder, fsync, ``os.replace``), so a killed run always leaves the previous checkpoint whole. They
load with ``torch.load(weights_only=True)`` and hold (format :data:`FORMAT_VERSION`):

- ``config``: the :class:`TrainConfig` as a dict;
- ``model``: the model's state_dict; for an ACN it includes the code bank (``bank.codes``), its
  used mask (``bank.used``) and its pass index and fallback count (``bank._extra_state``);
- ``optimizer``: Adam's state_dict;
- ``position``: pass index, ``order`` (the pass's example order), ``offset`` (examples of it
  done), ``step``, the running sums of the unfinished pass, elapsed seconds;
- ``rng``: the seed and torch's global RNG state (training itself draws only counter-based
  numbers, so the position fixes every future draw);
- ``history``: the per-pass metrics so far.

A resumed run (``--resume``) continues bit-for-bit where the checkpoint stopped, mid-pass too: on
CPU it produces the same weights as an uninterrupted run with the same ``--steps``/``--epochs``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import torch
from torch import nn

from . import rng
from .data import ImageData, load
from .models import ACN, VAE, build_model

FORMAT_VERSION = 1
CHECKPOINT = "checkpoint.pt"
PLOT_SECONDS = 30.0
"""metrics.png is redrawn after a pass at most this often (drawing takes about a second), and
always when training stops; metrics.json is rewritten after every pass."""


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


# ------------------------------------------------------------------------------------------------
# Files


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then os.replace: ``path`` always
    holds either the previous complete file or the new complete one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(text: str, path: str) -> None:
    """Write a text file with the same temporary-file-and-replace guarantee."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint dict (``torch.load(weights_only=True)``), its format version checked."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    version = ckpt.get("format_version") if isinstance(ckpt, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {version!r}, this library reads {FORMAT_VERSION}")
    return ckpt


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

    from .evaluate import heldout_terms

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


# ------------------------------------------------------------------------------------------------
# The command


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="acn-train",
        description="Train an Associative Compression Network (or the VAE baseline) on binarised images, "
        "then write reconstructions, daydreams, neighbours and metrics. With no arguments: an ACN with "
        "the MLP decoder on the embedded 5,000 MNIST digits for 3 minutes or 40 passes, whichever ends "
        "first, into runs/acn-default.",
    )
    p.add_argument("--model", choices=["acn", "vae"], default=d.model)
    p.add_argument("--encoder", choices=["mlp", "conv"], default=d.encoder)
    p.add_argument("--decoder", choices=["mlp", "conv", "pixelcnn"], default=d.decoder)
    p.add_argument("--data", default=d.data,
                   help="'mnist5k' (embedded default), a folder of MNIST IDX files (.gz or raw), or a .pt "
                   "file with a dict of tensors train_x [, train_y, test_x, test_y] (binarised, 0/1)")
    p.add_argument("--code-dim", type=int, default=d.code_dim)
    p.add_argument("--k", type=int, default=d.k, help="neighbours to draw from (K)")
    p.add_argument("--components", type=int, default=d.components, help="prior mixture components (M)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--minutes", type=float, default=d.minutes,
                   help="wall-clock training budget of this invocation (0 or less: none)")
    p.add_argument("--epochs", type=int, default=40,
                   help="total passes through the data (default 40: the embedded 4,000 training digits "
                   "overfit beyond about 40 passes; 0 or less: no limit)")
    p.add_argument("--steps", type=int, default=None, help="total optimiser steps")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="steps between mid-pass checkpoints (0: pass ends only)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: the default model's small matrices gain little from more, "
                   "and on a busy machine extra threads that compete for cores slow every step many-fold)")
    p.add_argument("--out", default=None, help="output folder (default runs/<model>-default)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default <out>/checkpoint.pt); the model options are "
                   "taken from it, the budget options from this command line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-report", action="store_true", help="skip the image grids after training")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join("runs", f"{args.model}-default")
    resume = None
    if args.resume is not None:
        path = os.path.join(out, CHECKPOINT) if args.resume == "auto" else args.resume
        resume = load_checkpoint(path)
        config = TrainConfig(**resume["config"])
    else:
        config = TrainConfig(model=args.model, encoder=args.encoder, decoder=args.decoder, data=args.data,
                             code_dim=args.code_dim, k=args.k, components=args.components,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    config.epochs = args.epochs if args.epochs is not None and args.epochs > 0 else None
    config.steps = args.steps
    config.minutes = args.minutes if args.minutes and args.minutes > 0 else None
    config.checkpoint_every, config.device = args.checkpoint_every, args.device
    if config.epochs is None and config.steps is None and config.minutes is None:
        print("acn-train: give a budget (--minutes, --epochs or --steps)", file=sys.stderr)
        return 2

    data = load(config.data)
    model = config.build(data.train_x.shape[0], data.image_shape).to(config.device)
    print(f"acn-train: {config.model} ({config.encoder} encoder, {config.decoder} decoder) on "
          f"{config.data}: {data.train_x.shape[0]} training / {data.test_x.shape[0]} held-out images "
          f"-> {out}")
    history = train(model, data, config, out, resume=resume, progress=not args.no_progress)

    from .evaluate import write_report

    summary = write_report(model, data, out, seed=config.seed, grids=not args.no_report, device=config.device)
    atomic_write_text(json.dumps({"history": history, "final": summary}, indent=1),
                      os.path.join(out, "metrics.json"))
    h = summary["heldout"]
    print(f"acn-train: held out: {h['test_loss']:.2f} nats/image = KL {h['test_kl']:.2f} + recon "
          f"{h['test_recon']:.2f}; wrote {', '.join(sorted(os.listdir(out)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
