"""Checkpoints of a training run, and the one atomic file write that every output of a run uses.

A checkpoint (``<out>/checkpoint.pt``, :data:`CHECKPOINT`) loads with
``torch.load(weights_only=True)`` and holds (format :data:`FORMAT_VERSION`):

- ``config``: the :class:`~acn_kernels.acn.config.TrainConfig` as a dict;
- ``model``: the model's state_dict, always in the single-process format (a distributed run
  gathers its sharded bank first); for an ACN it includes the code bank (``bank.codes``), its
  used mask (``bank.used``) and its pass index and fallback count (``bank._extra_state``);
- ``optimizer``: Adam's state_dict;
- ``position``: pass index, ``order`` (the pass's example order), ``offset`` (examples of it
  done), ``step``, ``sums`` (the running sums of the unfinished pass, over every process),
  ``elapsed`` seconds;
- ``rng``: the seed and torch's global RNG state (training itself draws only counter-based
  numbers, so the position fixes every future draw);
- ``history``: the per-pass metrics so far;
- ``world_size``: how many processes trained it (1 for a single process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

import torch

from .config import TrainConfig

FORMAT_VERSION = 1
CHECKPOINT = "checkpoint.pt"


def atomic_write(path: str, content: str | bytes | Callable[[IO[bytes]], None]) -> None:
    """Write ``content`` (text as UTF-8, bytes, or a function that writes into the open binary
    file) to ``path`` so that ``path`` always holds either its previous complete content or the
    new one, also across a crash or power loss.

    The content goes to a temporary file in the same folder, which is flushed and fsynced, then
    moved over ``path`` by ``os.replace`` (atomic on POSIX), and the folder is fsynced so that the
    rename itself is durable. On any error the temporary file is removed and ``path`` is untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def build_checkpoint(
    config: TrainConfig,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    position: dict[str, Any],
    history: list[dict[str, float]],
    *,
    world_size: int = 1,
) -> dict[str, Any]:
    """The checkpoint dict of the format above (``rng`` is this process's torch RNG state now)."""
    return {
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(config),
        "model": model_state,
        "optimizer": optimizer_state,
        "position": position,
        "rng": {"seed": config.seed, "torch": torch.get_rng_state()},
        "history": list(history),
        "world_size": int(world_size),
    }


def save_checkpoint(checkpoint: dict[str, Any], path: str) -> None:
    """``torch.save`` through :func:`atomic_write`: a killed run leaves the previous file whole."""
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint dict (``torch.load(weights_only=True)``), its format version checked."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    version = ckpt.get("format_version") if isinstance(ckpt, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {version!r}, this library reads {FORMAT_VERSION}")
    return ckpt


__all__ = ["CHECKPOINT", "FORMAT_VERSION", "atomic_write", "build_checkpoint", "load_checkpoint", "save_checkpoint"]
