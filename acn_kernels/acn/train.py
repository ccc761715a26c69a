"""The ACN training loop (see :func:`train`; the command line is :mod:`acn_kernels.acn.cli`).

The loop, in short::

    for each pass p:                                   # model.pass_index
        order = rng.permutation(seed, p, N)            # counter-based: no RNG state to carry
        for each batch idx of order:
            sums += train_step(model, adam, x[idx], idx)   # bank update + neighbours + fused KL
                                                           # + recon, backward, Adam
        model.new_pass()                               # clears the bank's used mask

The loop reads the device only where it logs (every 10 steps), checkpoints and ends a pass; the
running sums stay on the device in between. These are also the points where a bank that checks
its arguments on the device (a capturable CUDA bank, ``TrainConfig.capturable``) raises what it
found (:meth:`~acn_kernels.CodeBank.raise_deferred_errors`), so with a capturable bank a step on
a GPU never synchronises with the host (:func:`train_step`).

Checkpoints (``<out>/checkpoint.pt``, format: :mod:`acn_kernels.acn.checkpoint`) are written at
the end of every pass, every ``checkpoint_every`` steps and when the budget runs out, atomically,
so a killed run always leaves the previous checkpoint whole.

A resumed run (``--resume``) continues bit-for-bit where the checkpoint stopped, mid-pass too: on
CPU it produces the same weights as an uninterrupted run with the same ``--steps``/``--epochs``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import rng
from .checkpoint import (
    CHECKPOINT,
    CheckpointError,
    atomic_write,
    build_checkpoint,
    check_schema,
    load_state,
    remove_stale_temporaries,
    save_checkpoint,
    write_json,
)
from .config import TrainConfig
from .data import ImageData
from .evaluate import heldout_terms
from .likelihood import bits_per_dim
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
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
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

    def begin(self, fields: Callable[[], dict[str, str]]) -> None:
        """Called by every process before anything else of a run: a distributed run compares
        ``fields()`` (:func:`run_fields`) across its ranks and raises on every rank if they differ;
        one process has nothing to compare (and does not call it)."""

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
        """The checkpoint's ``position`` (on the CPU), holding ``sums`` (the run's, over every process)."""
        return {"pass_index": self.pass_index, "order": self.order.cpu(), "offset": self.offset,
                "step": self.step, "sums": sums.to("cpu", copy=True), "elapsed": self.elapsed}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> Position:
        """A position on ``device`` (order and sums) from a checkpoint's ``position``."""
        return cls(state["pass_index"], state["order"].to(device), state["offset"], state["step"],
                   state["sums"].to(device, copy=True), state["elapsed"])


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's dtype, shape and bytes (on the CPU, row-major)."""
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def run_fields(config: TrainConfig, data: ImageData, resume: dict[str, Any] | None) -> dict[str, str]:
    """What every process of one run must agree on, as short strings: each field of ``config``
    but ``device`` (which names each rank's own GPU), the training images (sha256 of
    ``data.train_x``, :func:`tensor_digest`), and where a resumed run starts (pass, offset, step
    and order of ``resume``'s position; "none" for a fresh run)."""
    fields = {f.name: repr(getattr(config, f.name)) for f in dataclasses.fields(config) if f.name != "device"}
    fields["training data"] = f"sha256 {tensor_digest(data.train_x)[:16]}"
    position = (resume or {}).get("position")
    if isinstance(position, dict):
        order = position.get("order")
        order = tensor_digest(order)[:16] if isinstance(order, torch.Tensor) else repr(order)
        fields["resumed position"] = ", ".join(f"{k}={position.get(k)!r}" for k in ("pass_index", "offset", "step"))
        fields["resumed position"] += f", order sha256 {order}"
    else:
        fields["resumed position"] = "none" if resume is None else repr(type(position).__name__)
    return fields


def check_position(state: dict[str, Any], n: int, seed: int) -> None:
    """Raise :class:`~acn_kernels.acn.checkpoint.CheckpointError` unless a checkpoint's
    ``position`` (of the types :func:`~acn_kernels.acn.checkpoint.check_schema` checks) can
    continue a run on ``n`` training examples with ``seed``: ``pass_index`` >= 0, ``order``
    that pass's order of range(n) (int64 [n],
    :func:`acn_kernels.acn.rng.permutation`), 0 <= ``offset`` < n (a finished pass is saved as
    the next one at offset 0), ``step`` >= 0, ``sums`` float64 [4], ``elapsed`` >= 0. A data set
    that changed size since the checkpoint fails here (a VAE has no bank whose size would
    notice). :func:`train` also checks that ``pass_index`` is the restored model's."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"the checkpoint's position cannot continue this run: {why}")

    order, offset, step, pass_index = state["order"], state["offset"], state["step"], state["pass_index"]
    if pass_index < 0:
        raise bad(f"pass_index must be >= 0, got {pass_index}")
    if order.dtype != torch.int64 or order.dim() != 1:
        raise bad(f"order must be a 1-D int64 tensor, got {order.dtype} of shape {tuple(order.shape)}")
    if order.shape[0] != n:
        raise bad(f"its pass order covers {order.shape[0]} examples but the training data has {n}: the data "
                  "changed since the checkpoint was written (resume on the data it was trained on)")
    if not torch.equal(order.cpu(), rng.permutation(seed, pass_index, n)):
        raise bad(f"order is not pass {pass_index}'s order of {n} examples with seed {seed}")
    if not 0 <= offset < n:
        raise bad(f"offset must lie in [0, {n}), got {offset}")
    if step < 0:
        raise bad(f"step must be >= 0, got {step}")
    if state["sums"].dtype != torch.float64 or state["sums"].shape != (4,):
        raise bad("sums must be a float64 tensor of shape [4]")
    if not state["elapsed"] >= 0:
        raise bad(f"elapsed must be >= 0, got {state['elapsed']}")


def train_step(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    index: torch.Tensor,
    global_batch: int | None = None,
    world_size: int = 1,
    agree: Callable[[BaseException | None], None] | None = None,
) -> torch.Tensor:
    """One optimiser step of :func:`train`: forward, backward and ``opt.step()`` on one batch.

    Args:
        net: the model (an :class:`~acn_kernels.ACN`: encode, the bank's write and batch-order
            neighbours, prior network, fused KL, decoder; or a :class:`~acn_kernels.VAE`), or
            what wraps it (DistributedDataParallel); ``net(x, index)`` returns
            :class:`~acn_kernels.acn.models.LossTerms`.
        opt: its optimiser (gradients are set to None, then filled by this batch alone).
        x: images [b, C, H, W] of the training examples ``index`` [b] int64 (bank rows).
        global_batch: the examples of the step over every process (default b); the loss
            differentiated is the batch's summed loss * ``world_size`` / ``global_batch``, so that
            gradients averaged over ``world_size`` processes are those of the global mean loss.
        agree: called with the forward pass's exception, or None, between the forward and the
            backward pass (the loop tells the other processes and checks its budget there); it
            raises for a failure. Without it a failed forward pass raises at once.

    Returns:
        The batch's sums [4] float64 on x's device: examples, loss, KL and reconstruction nats.
        Nothing is read on the host, so on a GPU with a capturable bank
        (``CodeBank(capturable=True)``) the step never synchronises, and for a fixed batch it can
        be captured in a CUDA graph with an ``Adam(capturable=True)``.
    """
    error = None
    try:
        terms = net(x, index)
    except Exception as e:  # the loop tells the other processes, then it is re-raised
        error = e
    if agree is not None:
        agree(error)
    if error is not None:
        raise error
    opt.zero_grad(set_to_none=True)
    (terms.loss.sum() * world_size / (index.numel() if global_batch is None else global_batch)).backward()
    opt.step()
    loss = terms.loss.detach()
    return torch.stack([loss.new_full((), float(index.numel())), loss.sum(), terms.kl.detach().sum(),
                        terms.recon.detach().sum()]).double()


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
        data: images on the grid the decoder's likelihood models (``data.levels`` must equal
            ``model.decoder.likelihood.levels``: 2 for Bernoulli, 256 for the 8-bit likelihoods);
            ``data.test_x`` gives held-out metrics after each pass.
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
        The per-pass metrics (loss, kl, recon per image, train and held out, in nats, and the loss
        in bits per dimension, ``*_bpd``; the held-out ones on the writing process only).

    Raises:
        ValueError: ``config`` out of range (:meth:`TrainConfig.validate`); in a distributed run,
            :class:`~acn_kernels.acn.distributed.RunMismatch` on every rank if the ranks' configs,
            training images or resumed positions differ (:func:`run_fields`).
        CheckpointError: ``resume`` cannot continue on this data: its position
            (:func:`check_position`) or its model and optimiser state do not fit.
        ValueError: also, where the loop reads the device (logging every 10 steps, a checkpoint,
            a pass end, the end), an argument error an ACN's bank found on the device since the
            last such point (:meth:`~acn_kernels.CodeBank.raise_deferred_errors`), with the
            bank's message; then no checkpoint holds the step that caused it.
    """
    from tqdm.auto import tqdm

    likelihood = model.decoder.likelihood
    if data.levels != likelihood.levels:
        raise ValueError(f"the data have {data.levels} pixel levels but the decoder's {likelihood!r} models "
                         f"{likelihood.levels}; load the data with levels={likelihood.levels} "
                         "(TrainConfig.load_data does)")

    runtime = Runtime() if runtime is None else runtime
    runtime.begin(lambda: run_fields(config, data, resume))
    config.validate()
    if isinstance(model, ACN) and model.bank.capturable != config.capturable:
        raise ValueError(f"config.capturable is {config.capturable} but the model's bank has capturable="
                         f"{model.bank.capturable}: build the model with config.build (a data-parallel run's "
                         "sharded bank has no capturable mode)")
    device = torch.device(config.device)
    x = data.train_x.to(device)
    n = x.shape[0]
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    history: list[dict[str, float]] = []
    if resume is None:
        pos = Position(model.pass_index, rng.permutation(config.seed, model.pass_index, n, device),
                       sums=torch.zeros(4, dtype=torch.float64, device=device))
    else:
        check_schema(resume, "resume")
        position = resume["position"]
        check_position(position, n, config.seed)  # first: a bank's size mismatch says less
        load_state(model, resume["model"], "the checkpoint's model state")
        load_state(opt, resume["optimizer"], "the checkpoint's optimiser state")
        if position["pass_index"] != model.pass_index:
            raise CheckpointError(f"the checkpoint's position is at pass {position['pass_index']} but its model "
                                  f"state at pass {model.pass_index}")
        torch.set_rng_state(resume["rng"]["torch"])
        pos = Position.from_state(position, device)
        pos.sums = runtime.share(pos.sums)
        history = list(resume["history"])
    net = runtime.wrap(model)
    writes = out_dir is not None and runtime.writes
    if writes:
        os.makedirs(out_dir, exist_ok=True)
        remove_stale_temporaries(out_dir)

    def save(whole: ACN | VAE | None) -> None:
        """Every process calls it (the sums are collective); ``whole``: runtime.whole(model)."""
        sums = runtime.total(pos.sums)
        if writes:
            ckpt = build_checkpoint(config, whole.state_dict(), opt.state_dict(), pos.state(sums), history,
                                    world_size=runtime.world_size)
            save_checkpoint(ckpt, os.path.join(out_dir, CHECKPOINT))

    def sync_point() -> None:
        """Where the loop reads the device anyway: raise what a deferring bank found since the last one."""
        if isinstance(model, ACN):
            model.bank.raise_deferred_errors()

    def agree(error: BaseException | None) -> None:
        """Between a step's forward and backward pass: tell the processes, check the budget."""
        nonlocal time_up
        pos.elapsed = elapsed0 + time.monotonic() - start
        late = config.minutes is not None and pos.elapsed - elapsed0 >= 60 * config.minutes
        time_up = runtime.agree(error, late)

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
    time_up, stop = False, out_of_steps()
    while not stop:
        batch = pos.order[pos.offset : pos.offset + config.batch_size]
        if batch.numel() == 0:  # never with a checked position: an empty step would repeat forever
            raise RuntimeError(f"no examples left at offset {pos.offset} of pass {pos.pass_index} ({n} examples)")
        idx = runtime.local(batch)
        pos.sums += train_step(net, opt, x[idx], idx, batch.numel(), runtime.world_size, agree)
        pos.offset += batch.numel()
        pos.step += 1
        bar.update(1)
        if pos.step % 10 == 0:
            sync_point()
            count, loss, kl, recon = pos.sums.tolist()
            if count > 0:
                bar.set_postfix(epoch=len(history) + 1, loss=f"{loss / count:.2f}", kl=f"{kl / count:.2f}",
                                recon=f"{recon / count:.2f}")

        if pos.offset >= n:  # end of the pass
            sync_point()
            sums = runtime.total(pos.sums)
            loss, kl, recon = (sums[1:] / sums[0]).tolist()
            row = {"epoch": len(history) + 1, "step": pos.step, "train_loss": loss, "train_kl": kl,
                   "train_recon": recon, "train_bpd": bits_per_dim(loss, data.image_shape)}
            model.new_pass()
            whole = runtime.whole(model)
            heldout = None if whole is None else heldout_terms(whole, data.test_x, device=device)
            if heldout is not None:  # None: no held-out images (the row then has no test_* keys)
                row.update(heldout)
            if isinstance(model, ACN):
                row["fallbacks"] = model.bank.fallbacks
            row["elapsed_s"] = elapsed0 + time.monotonic() - start
            history.append(row)
            bar.set_postfix(epoch=row["epoch"], loss=f"{loss:.2f}", kl=f"{kl:.2f}", recon=f"{recon:.2f}")
            pos.pass_index = model.pass_index
            pos.order = rng.permutation(config.seed, pos.pass_index, n, device)
            pos.offset, pos.sums = 0, torch.zeros(4, dtype=torch.float64, device=device)
            if writes:
                write_json(os.path.join(out_dir, "metrics.json"), {"history": history})
                if time.monotonic() - plotted_at >= PLOT_SECONDS:
                    plot_history(history, os.path.join(out_dir, "metrics.png"))
                    plotted_at, plotted_passes = time.monotonic(), len(history)
            if out_dir is not None:
                save(whole)
            saved_at = pos.step
        elif out_dir is not None and config.checkpoint_every and pos.step % config.checkpoint_every == 0:
            sync_point()
            save(runtime.whole(model))
            saved_at = pos.step
        stop = time_up or out_of_steps()
    bar.close()
    sync_point()
    if out_dir is not None and saved_at != pos.step:
        save(runtime.whole(model))
    if writes and len(history) != plotted_passes:
        plot_history(history, os.path.join(out_dir, "metrics.png"))
    return history


__all__ = ["PLOT_SECONDS", "Position", "Runtime", "check_position", "plot_history", "run_fields",
           "tensor_digest", "train", "train_step"]
