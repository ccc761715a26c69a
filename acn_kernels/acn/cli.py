"""The command line: ``acn-train`` (:func:`train_main`) and ``acn-eval`` (:func:`eval_main`),
with the one argument parser of acn-train (:func:`parser`).

``acn-train`` is also the data-parallel command: ``torchrun --nproc-per-node W -m
acn_kernels.acn.cli [options]`` runs :func:`train_main` on every rank (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import torch

from ..ops import MAX_K
from . import compare
from .checkpoint import (
    CHECKPOINT,
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_state,
    remove_stale_temporaries,
    write_json,
)
from .config import TrainConfig
from .data import ImageData
from .distributed import RunMismatch, process_group
from .evaluate import baselines, write_report
from .likelihood import LIKELIHOODS
from .models import ACN, VAE
from .train import Runtime, train

# ------------------------------------------------------------------------------------------------
# Option values: every numeric option is checked by its argparse type, so a bad value ends in one
# line naming the flag ("acn-train: error: argument --batch-size: ...", exit status 2).


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: message`` and exit status 2 (the usage is
    left to ``--help``). Tracebacks are left to bugs."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (high None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text}")
        return value
    return parse


def number(*, positive: bool) -> Callable[[str], float]:
    """An argparse type: a finite float, > 0 (``positive``) or >= 0."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"must be a finite number {'> 0' if positive else '>= 0'}, got {text}")
        return value
    return parse


positive_int, nonneg_int = integer(1), integer(0)
positive_float, nonneg_float = number(positive=True), number(positive=False)


def device_arg(text: str) -> str:
    """An argparse type: "cpu", "cuda" or "cuda:N", a GPU only where one is available."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is available to this process "
                                             "(torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this process sees {torch.cuda.device_count()} GPU(s)")
    return text


def data_arg(text: str) -> str:
    """An argparse type: "mnist5k", or a folder or file that exists (its content is checked by
    :func:`~acn_kernels.acn.data.load`)."""
    if text != "mnist5k" and not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder (expected 'mnist5k', a folder of "
                                         "MNIST IDX files or a .pt file)")
    return text


def load_data(p: argparse.ArgumentParser, config: TrainConfig) -> ImageData:
    """:meth:`TrainConfig.load_data`, a file it cannot use ending in ``p.error``."""
    try:
        return config.load_data()
    except (OSError, ValueError, TypeError) as e:
        p.error(f"argument --data: {e}")


def build(p: argparse.ArgumentParser, config: TrainConfig, data: ImageData) -> ACN | VAE:
    """``config.build`` on the CPU for ``data``, model options that do not fit the data ending in
    ``p.error``."""
    try:
        return config.build(data.train_x.shape[0], data.image_shape)
    except ValueError as e:
        p.error(f"the model options do not fit the data ({config.data}, images {data.image_shape}): {e}")


MODEL_OPTIONS = ("model", "encoder", "decoder", "data", "likelihood", "logistic_components", "code_dim", "k",
                 "components", "batch_size", "lr", "seed")
"""The options that define the model and its training (TrainConfig fields): a resumed run takes
them from its checkpoint, so given with ``--resume`` they must agree with it. Their parser
default is None ("not given"); TrainConfig's defaults apply to a new run."""


def parser() -> argparse.ArgumentParser:
    """The parser of ``acn-train``'s options (one for every entry point)."""
    d = TrainConfig()
    p = Parser(
        prog="acn-train",
        description="Train an Associative Compression Network (or the VAE baseline) on binarised images "
        "(or 8-bit grey-level or colour ones, see --likelihood), then write reconstructions, daydreams, "
        "neighbours and metrics. With no arguments: an ACN with "
        "the MLP decoder on the embedded 5,000 MNIST digits for 3 minutes or 40 passes, whichever ends "
        "first, into runs/acn-default.",
    )
    p.add_argument("--model", choices=["acn", "vae"], help=f"default {d.model}")
    p.add_argument("--encoder", choices=["mlp", "conv"], help=f"default {d.encoder}")
    p.add_argument("--decoder", choices=["mlp", "conv", "pixelcnn"], help=f"default {d.decoder}")
    p.add_argument("--data", type=data_arg,
                   help="'mnist5k' (embedded default: 0-255 digits), a folder of MNIST IDX files (.gz or raw), "
                   "a folder of images (PNG, JPEG, ...; grey or RGB; optional train/ and test/, and class "
                   "subfolders), or a .pt file with a dict of tensors train_x [, train_y, test_x, test_y]. "
                   "With the bernoulli likelihood 8-bit sources are binarised at 128 and tensors must hold "
                   "0/1; with the others images are 8-bit (uint8 0-255 or floats k/255)")
    p.add_argument("--likelihood", choices=sorted(LIKELIHOODS),
                   help=f"the decoder's pixel likelihood: bernoulli (binarised images, the default {d.likelihood}), "
                   "logistic (8-bit: a mixture of discretised logistics, PixelCNN++'s) or categorical (8-bit: "
                   "256-way softmax; large output layers)")
    p.add_argument("--logistic-components", type=positive_int,
                   help=f"mixture components per pixel of the logistic likelihood (default {d.logistic_components})")
    p.add_argument("--code-dim", type=positive_int, help=f"code size D (default {d.code_dim})")
    p.add_argument("--k", type=integer(1, MAX_K), help=f"neighbours to draw from (K, 1 to {MAX_K}; default {d.k})")
    p.add_argument("--components", type=positive_int, help=f"prior mixture components (M; default {d.components})")
    p.add_argument("--batch-size", type=positive_int, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=positive_float, help=f"Adam's learning rate (default {d.lr})")
    p.add_argument("--seed", type=integer(0, 2**64 - 1), help=f"default {d.seed}")
    p.add_argument("--minutes", type=nonneg_float, default=d.minutes,
                   help="wall-clock training budget of this invocation (0: none)")
    p.add_argument("--epochs", type=nonneg_int, default=40,
                   help="total passes through the data (default 40: the embedded 4,000 training digits "
                   "overfit beyond about 40 passes; 0: no limit)")
    p.add_argument("--steps", type=nonneg_int, default=0, help="total optimiser steps (0, the default: no limit)")
    p.add_argument("--checkpoint-every", type=nonneg_int, default=d.checkpoint_every,
                   help="steps between mid-pass checkpoints (0: pass ends only)")
    p.add_argument("--device", type=device_arg, default=d.device, help="cpu, cuda or cuda:N")
    p.add_argument("--capturable", action="store_true",
                   help="an ACN's bank resolves each batch with fixed work and, on a GPU, without a host "
                   f"synchronisation (the same results; --batch-size at most {MAX_K} - K + 1; one process only)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="CPU threads (default 1: the default model's small matrices gain little from more, "
                   "and on a busy machine extra threads that compete for cores slow every step many-fold)")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/<model>-default; with --resume CHECKPOINT, its folder)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default <out>/checkpoint.pt) in its folder (or --out); the "
                   "model options (--model ... --seed) are taken from it and, if given, must agree with it; "
                   "the budget options (--minutes, --epochs, --steps, --checkpoint-every, --device, --capturable, "
                   "--threads) come from this command line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-report", action="store_true", help="skip the image grids after training")
    return p


def _same_option(name: str, given: object, saved: object) -> bool:
    """Whether a model option given with --resume agrees with the checkpoint's value (a data path
    may be spelt another way)."""
    if given == saved:
        return True
    return (name == "data" and isinstance(saved, str) and os.path.exists(str(given)) and os.path.exists(saved)
            and os.path.samefile(str(given), saved))


def train_main(argv: list[str] | None = None) -> int:
    """``acn-train [options]`` (see :func:`parser`): train, then write the report.

    Started by ``torchrun`` (``WORLD_SIZE`` set in the environment) every rank runs it and the run
    is data-parallel (:mod:`acn_kernels.acn.distributed`): ``--batch-size`` is the global batch,
    ``--device cuda`` means this rank's GPU (NCCL; Gloo on CPUs), rank 0 writes every file.
    """
    p = parser()
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    given = {name: getattr(args, name) for name in MODEL_OPTIONS if getattr(args, name) is not None}
    resume = resume_path = None
    if args.resume is None:
        config = TrainConfig(**given)
        out = args.out or os.path.join("runs", f"{config.model}-default")
    else:
        if args.resume == "auto":
            out = args.out or os.path.join("runs", f"{given.get('model', TrainConfig.model)}-default")
            resume_path = os.path.join(out, CHECKPOINT)
        else:  # resume in the checkpoint's own folder, not next to another run in runs/<model>-default
            resume_path = args.resume
            out = args.out or os.path.dirname(resume_path) or "."
        if not os.path.isfile(resume_path):
            p.error(f"argument --resume: {resume_path}: no such checkpoint")
        try:
            resume = load_checkpoint(resume_path)
        except CheckpointError as e:
            p.error(f"argument --resume: {e}")
        config = TrainConfig(**resume["config"])
        conflicts = [f"--{name.replace('_', '-')} {value} (the checkpoint has {getattr(config, name)})"
                     for name, value in given.items() if not _same_option(name, value, getattr(config, name))]
        if conflicts:
            p.error(f"argument --resume: {resume_path} fixes the model options, and these differ from it: "
                    f"{'; '.join(conflicts)}; drop them, or start a new run (another --out)")
    config.epochs, config.steps = args.epochs or None, args.steps or None
    config.minutes = args.minutes or None
    config.checkpoint_every, config.device = args.checkpoint_every, args.device
    config.capturable = args.capturable
    if config.epochs is None and config.steps is None and config.minutes is None:
        p.error("give a budget: --minutes, --epochs or --steps (0 means no limit for each)")
    if config.capturable:  # the other fields are checked by their argparse types or the checkpoint's schema
        if "WORLD_SIZE" in os.environ:
            p.error("argument --capturable: a data-parallel run's sharded bank has no capturable mode (its "
                    "collectives read the host every step); drop --capturable under torchrun")
        try:
            config.validate()
        except ValueError as e:
            p.error(f"argument --capturable: {e}")
    # Everything the command line decides is checked before any process group exists.
    data = load_data(p, config)
    model = build(p, config, data)
    try:
        if "WORLD_SIZE" not in os.environ:
            _train(model, data, config, out, resume, args, Runtime())
            return 0
        with process_group(args.device) as (runtime, device):
            config.device = device
            _train(model, data, config, out, resume, args, runtime)
    except CheckpointError as e:  # the position or state of --resume's checkpoint does not fit
        p.error(f"argument --resume: {resume_path}: {e}")
    except RunMismatch as e:  # torchrun: this rank's command line, data or checkpoint is not rank 0's
        p.error(str(e))
    return 0


def _train(model: ACN | VAE, data: ImageData, config: TrainConfig, out: str, resume: dict[str, Any] | None,
           args: argparse.Namespace, runtime: Runtime) -> None:
    model = runtime.prepare(model.to(config.device))
    ranks = f" on {runtime.world_size} processes" if runtime.world_size > 1 else ""
    if runtime.writes:
        print(f"acn-train: {config.model} ({config.encoder} encoder, {config.decoder} decoder, "
              f"{config.likelihood} likelihood) on "
              f"{config.data}: {data.train_x.shape[0]} training / {data.test_x.shape[0]} held-out images"
              f"{ranks} -> {out}")
    history = train(model, data, config, out, resume=resume, progress=not args.no_progress, runtime=runtime)
    whole = runtime.whole(model)
    if not runtime.writes:
        return
    summary = write_report(whole, data, out, seed=config.seed, grids=not args.no_report, device=config.device)
    write_json(os.path.join(out, "metrics.json"), {"history": history, "final": summary})
    h = summary["heldout"]
    nats = ("no held-out images" if h is None else
            f"held out: {h['test_loss']:.2f} nats/image = KL {h['test_kl']:.2f} + recon {h['test_recon']:.2f} "
            f"({h['test_bpd']:.4f} bits/dim)")
    print(f"acn-train: {nats}; wrote {', '.join(sorted(os.listdir(out)))}")


# ------------------------------------------------------------------------------------------------
# acn-eval


def _table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | held-out KL | held-out recon | held-out total | bits/dim | linear probe | k-NN (k=5) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        h = r.get("heldout")
        rep = r.get("representation", {})
        nats = (f"{h['test_kl']:.2f} | {h['test_recon']:.2f} | {h['test_loss']:.2f} | {h['test_bpd']:.4f}"
                if h else "- | - | - | -")
        acc = " | ".join(f"{100 * rep[key]:.1f}%" if rep.get(key) is not None else "-"
                         for key in ("linear_probe", "knn"))
        lines.append(f"| {name} | {nats} | {acc} |")
    return "\n".join(lines)


def _evaluate_run(p: argparse.ArgumentParser, argument: str, run: str, out: str,
                  args: argparse.Namespace) -> tuple[dict[str, Any], TrainConfig, ImageData, list[dict[str, float]]]:
    """Load run ``run`` (a folder holding checkpoint.pt, or a checkpoint file) and evaluate it
    into ``out`` (:func:`~acn_kernels.acn.evaluate.write_report`, options ``args.device``,
    ``args.no_grids``, ``args.daydream_steps``): (its results with "config" and "steps" added, its
    config, its data, its history: the per-pass rows of its checkpoint). A missing or unusable
    checkpoint ends in ``p.error`` naming ``argument``."""
    path = os.path.join(run, CHECKPOINT) if os.path.isdir(run) else run
    if not os.path.isfile(path):
        p.error(f"argument {argument}: {path}: no such checkpoint")
    try:
        ckpt = load_checkpoint(path)
        config = TrainConfig(**ckpt["config"])
        data = load_data(p, config)
        model = build(p, config, data)
        load_state(model, ckpt["model"], f"{path}: the model state")
    except CheckpointError as e:
        p.error(f"argument {argument}: {e}")
    model.to(args.device)
    res = write_report(model, data, out, seed=config.seed, device=args.device, grids=not args.no_grids,
                       daydream_steps=args.daydream_steps)
    res["config"] = ckpt["config"]
    res["steps"] = ckpt["position"]["step"]
    return res, config, data, ckpt["history"]


def _evaluation_options(p: argparse.ArgumentParser, out: str) -> None:
    """The options acn-eval and acn-compare share."""
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads (as acn-train's --threads)")
    p.add_argument("--daydream-steps", type=nonneg_int, default=10)
    p.add_argument("--no-baselines", action="store_true", help="skip the pixel and PCA references")
    p.add_argument("--no-grids", action="store_true",
                   help="skip the image grids (slow for an autoregressive decoder: one pass per pixel)")


def eval_main(argv: list[str] | None = None) -> int:
    """``acn-eval RUN [RUN ...]``: evaluate trained runs (folders holding checkpoint.pt, or
    checkpoint files), with the raw-pixel and PCA references."""
    p = Parser(prog="acn-eval", description=eval_main.__doc__)
    p.add_argument("runs", nargs="+", help="run folders (with checkpoint.pt) or checkpoint files")
    _evaluation_options(p, "runs/eval")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    results: dict[str, dict[str, Any]] = {}
    data = None
    for run in args.runs:
        name = compare.run_name(run)
        res, config, data, _ = _evaluate_run(p, "runs", run, os.path.join(args.out, name), args)
        results[f"{name} ({config.model}, {config.decoder}, {config.likelihood}, {res['steps']} steps)"] = res
    if not args.no_baselines and data is not None and data.train_y is not None and data.test_y is not None:
        for name, rep in baselines(data).items():
            results[name] = {"representation": rep}
    os.makedirs(args.out, exist_ok=True)
    remove_stale_temporaries(args.out)
    write_json(os.path.join(args.out, "eval.json"), results)
    table = _table(results)
    atomic_write(os.path.join(args.out, "eval.md"), table + "\n")
    print(table)
    return 0


# ------------------------------------------------------------------------------------------------
# acn-compare


def model_runs(text: str) -> tuple[str, list[str]]:
    """An argparse type: ``MODEL=RUN[,RUN...]``, each RUN a run folder, a checkpoint file or a
    glob pattern (quoted, so that acn-compare expands it) of which the folders holding a
    checkpoint.pt and the .pt files count (not, say, the logs beside them): at least one."""
    label, sep, runs = text.partition("=")
    if not sep or not label or not runs:
        raise argparse.ArgumentTypeError(f"expected MODEL=RUN[,RUN...], got {text!r}")
    found: list[str] = []
    for item in filter(None, runs.split(",")):
        matches = ([m for m in sorted(glob.glob(item))
                    if os.path.isfile(os.path.join(m, CHECKPOINT)) or (os.path.isfile(m) and m.endswith(".pt"))]
                   if glob.has_magic(item) else [item])
        if not matches:
            raise argparse.ArgumentTypeError(f"{label}: the pattern {item!r} matches no run")
        for run in matches:
            if not os.path.exists(run):
                raise argparse.ArgumentTypeError(f"{label}: {run}: no such run folder or checkpoint")
            found.append(run)
    if not found:
        raise argparse.ArgumentTypeError(f"{label}: no runs given in {text!r}")
    return label, found


def compare_main(argv: list[str] | None = None) -> int:
    """``acn-compare --runs MODEL=RUN,RUN... [MODEL=...]``: evaluate several runs (seeds) per
    model as acn-eval does and report the mean and standard deviation over each model's runs of
    every number (held-out KL, reconstruction and total nats, bits/dim, linear-probe and k-NN
    accuracy) with the raw-pixel and PCA references, in eval.json and eval.md, and the held-out
    curves of all runs in curves.png."""
    p = Parser(prog="acn-compare", description=compare_main.__doc__)
    p.add_argument("--runs", type=model_runs, nargs="+", required=True, metavar="MODEL=RUN[,RUN...]",
                   help="a model's label and its runs (folders with checkpoint.pt, checkpoint files or quoted "
                   "glob patterns), e.g. acn=runs/acn-s0,runs/acn-s1 vae='runs/vae-s*'")
    _evaluation_options(p, "runs/compare")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    labels = [label for label, _ in args.runs]
    if len(set(labels)) < len(labels):
        p.error(f"argument --runs: a model label is given twice ({', '.join(labels)}); list all its runs in one "
                "MODEL=RUN,RUN...")
    seen: dict[str, str] = {}
    for label, runs in args.runs:
        for run in runs:
            real = os.path.realpath(os.path.join(run, CHECKPOINT) if os.path.isdir(run) else run)
            if real in seen:
                p.error(f"argument --runs: {run} ({label}) is the same run as one of {seen[real]}")
            seen[real] = label

    models: dict[str, dict[str, Any]] = {}
    per_run: dict[str, list[dict[str, Any]]] = {}
    histories: dict[str, list[list[dict[str, float]]]] = {}
    data = first = None
    for label, runs in args.runs:
        results, histories[label], options = [], [], None
        for run in runs:
            name = compare.run_name(run)
            res, config, run_data, history = _evaluate_run(p, "--runs", run, os.path.join(args.out, label, name),
                                                           args)
            model_options = {key: getattr(config, key) for key in MODEL_OPTIONS if key != "seed"}
            if options is None:
                options = model_options
            elif model_options != options:
                differ = [f"{key} {model_options[key]!r} (first run: {options[key]!r})" for key in options
                          if model_options[key] != options[key]]
                p.error(f"argument --runs: {label}: {run} differs from the first run of {label} in more than the "
                        f"seed: {'; '.join(differ)}")
            if first is None:
                first, data = (config.data, config.likelihood), run_data
            elif (config.data, config.likelihood) != first:
                p.error(f"argument --runs: {run} ({label}) is trained on {config.data} ({config.likelihood}), "
                        f"the first run on {first[0]} ({first[1]}): compare runs on the same data")
            results.append({**res, "name": name, "seed": config.seed, "passes": len(history)})
            histories[label].append(history)
        models[label] = compare.aggregate(results)
        per_run[label] = results
        one = [key for key, s in models[label]["heldout"].items() if s["n"] == 1]
        if one:
            print(f"acn-compare: {label}: one run, so no standard deviation (n=1)", file=sys.stderr)
    references: dict[str, dict[str, Any]] = {}
    if not args.no_baselines and data is not None and data.train_y is not None and data.test_y is not None:
        references = baselines(data)
    os.makedirs(args.out, exist_ok=True)
    remove_stale_temporaries(args.out)
    write_json(os.path.join(args.out, "eval.json"),
               {"models": models, "references": references, "runs": per_run})
    table = compare.table(models, references)
    atomic_write(os.path.join(args.out, "eval.md"), table + "\n")
    compare.plot_curves(histories, os.path.join(args.out, "curves.png"))
    print(table)
    return 0


__all__ = ["compare_main", "eval_main", "parser", "train_main"]

if __name__ == "__main__":
    sys.exit(train_main())
