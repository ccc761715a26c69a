"""The command line: ``acn-train`` (:func:`train_main`) and ``acn-eval`` (:func:`eval_main`),
with the one argument parser of acn-train (:func:`parser`).

``acn-train`` is also the data-parallel command: ``torchrun --nproc-per-node W -m
acn_kernels.acn.cli [options]`` runs :func:`train_main` on every rank (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from .checkpoint import CHECKPOINT, atomic_write, load_checkpoint
from .config import TrainConfig
from .data import load
from .distributed import process_group
from .evaluate import baselines, write_report
from .train import Runtime, train


def parser() -> argparse.ArgumentParser:
    """The parser of ``acn-train``'s options (one for every entry point)."""
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


def train_main(argv: list[str] | None = None) -> int:
    """``acn-train [options]`` (see :func:`parser`): train, then write the report.

    Started by ``torchrun`` (``WORLD_SIZE`` set in the environment) every rank runs it and the run
    is data-parallel (:mod:`acn_kernels.acn.distributed`): ``--batch-size`` is the global batch,
    ``--device cuda`` means this rank's GPU (NCCL; Gloo on CPUs), rank 0 writes every file.
    """
    args = parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join("runs", f"{args.model}-default")
    resume = None
    if args.resume is not None:
        resume = load_checkpoint(os.path.join(out, CHECKPOINT) if args.resume == "auto" else args.resume)
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
    if "WORLD_SIZE" not in os.environ:
        _train(config, out, resume, args, Runtime())
        return 0
    with process_group(args.device) as (runtime, device):
        config.device = device
        _train(config, out, resume, args, runtime)
    return 0


def _train(config: TrainConfig, out: str, resume: dict[str, Any] | None, args: argparse.Namespace,
           runtime: Runtime) -> None:
    data = load(config.data)
    model = runtime.prepare(config.build(data.train_x.shape[0], data.image_shape).to(config.device))
    ranks = f" on {runtime.world_size} processes" if runtime.world_size > 1 else ""
    if runtime.writes:
        print(f"acn-train: {config.model} ({config.encoder} encoder, {config.decoder} decoder) on "
              f"{config.data}: {data.train_x.shape[0]} training / {data.test_x.shape[0]} held-out images"
              f"{ranks} -> {out}")
    history = train(model, data, config, out, resume=resume, progress=not args.no_progress, runtime=runtime)
    whole = runtime.whole(model)
    if not runtime.writes:
        return
    summary = write_report(whole, data, out, seed=config.seed, grids=not args.no_report, device=config.device)
    atomic_write(os.path.join(out, "metrics.json"), json.dumps({"history": history, "final": summary}, indent=1))
    h = summary["heldout"]
    print(f"acn-train: held out: {h['test_loss']:.2f} nats/image = KL {h['test_kl']:.2f} + recon "
          f"{h['test_recon']:.2f}; wrote {', '.join(sorted(os.listdir(out)))}")


# ------------------------------------------------------------------------------------------------
# acn-eval


def _table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | held-out KL | held-out recon | held-out total | linear probe | k-NN (k=5) |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        h = r.get("heldout")
        rep = r.get("representation", {})
        nats = (f"{h['test_kl']:.2f} | {h['test_recon']:.2f} | {h['test_loss']:.2f}" if h else "- | - | -")
        acc = " | ".join(f"{100 * rep[key]:.1f}%" if key in rep else "-" for key in ("linear_probe", "knn"))
        lines.append(f"| {name} | {nats} | {acc} |")
    return "\n".join(lines)


def eval_main(argv: list[str] | None = None) -> int:
    """``acn-eval RUN [RUN ...]``: evaluate trained runs (folders holding checkpoint.pt, or
    checkpoint files), with the raw-pixel and PCA references."""
    p = argparse.ArgumentParser(prog="acn-eval", description=eval_main.__doc__)
    p.add_argument("runs", nargs="+", help="run folders (with checkpoint.pt) or checkpoint files")
    p.add_argument("--out", default="runs/eval", help="output folder (default runs/eval)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (as acn-train's --threads)")
    p.add_argument("--daydream-steps", type=int, default=10)
    p.add_argument("--no-baselines", action="store_true", help="skip the pixel and PCA references")
    p.add_argument("--no-grids", action="store_true",
                   help="skip the image grids (slow for an autoregressive decoder: one pass per pixel)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    results: dict[str, dict[str, Any]] = {}
    data = None
    for run in args.runs:
        path = os.path.join(run, CHECKPOINT) if os.path.isdir(run) else run
        ckpt = load_checkpoint(path)
        config = TrainConfig(**ckpt["config"])
        data = load(config.data)
        model = config.build(data.train_x.shape[0], data.image_shape)
        model.load_state_dict(ckpt["model"])
        model.to(args.device)
        name = os.path.basename(os.path.normpath(run if os.path.isdir(run) else os.path.dirname(path)))
        res = write_report(model, data, os.path.join(args.out, name), seed=config.seed, device=args.device,
                           grids=not args.no_grids, daydream_steps=args.daydream_steps)
        res["config"] = ckpt["config"]
        res["steps"] = ckpt["position"]["step"]
        results[f"{name} ({config.model}, {config.decoder}, {res['steps']} steps)"] = res
    if not args.no_baselines and data is not None and data.train_y is not None and data.test_y is not None:
        for name, rep in baselines(data).items():
            results[name] = {"representation": rep}
    os.makedirs(args.out, exist_ok=True)
    atomic_write(os.path.join(args.out, "eval.json"), json.dumps(results, indent=1))
    table = _table(results)
    atomic_write(os.path.join(args.out, "eval.md"), table + "\n")
    print(table)
    return 0


__all__ = ["eval_main", "parser", "train_main"]

if __name__ == "__main__":
    sys.exit(train_main())
