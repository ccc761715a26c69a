"""Checkpoints of a training run, written atomically, and the atomic file write itself.

A checkpoint (``<out>/checkpoint.pt``, :data:`CHECKPOINT`) loads with
``torch.load(weights_only=True)`` and holds (format :data:`FORMAT_VERSION`):

- ``config``: the :class:`~acn_kernels.acn.config.TrainConfig` as a dict;
- ``model``: the model's state_dict; for an ACN it includes the code bank (``bank.codes``), its
  used mask (``bank.used``) and its pass index and fallback count (``bank._extra_state``);
- ``optimizer``: Adam's state_dict;
- ``position``: pass index, ``order`` (the pass's example order), ``offset`` (examples of it
  done), ``step``, the running sums of the unfinished pass, elapsed seconds;
- ``rng``: the seed and torch's global RNG state (training itself draws only counter-based
  numbers, so the position fixes every future draw);
- ``history``: the per-pass metrics so far.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

import torch

FORMAT_VERSION = 1
CHECKPOINT = "checkpoint.pt"


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


__all__ = ["CHECKPOINT", "FORMAT_VERSION", "atomic_save", "atomic_write_text", "load_checkpoint"]
