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
- ``world_size``: how many processes trained it (1 for a single process);
- ``sha256``: the content digest (:func:`content_digest`) of everything above, added by
  :func:`save_checkpoint` and verified (then removed) by :func:`load_checkpoint`, so a file whose
  bytes changed after it was written (a flipped bit, an edit) is refused instead of resumed.

:func:`load_checkpoint` also checks the schema (:func:`check_schema`: the keys above and their
types) and raises :class:`CheckpointError` naming the file for anything it cannot use: a file
that does not load (empty, truncated, not a checkpoint), another format, a digest that does not
match, a missing key or a key of the wrong type. Format 1 (the same content without ``sha256``)
still loads, with a warning that its integrity cannot be checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
import warnings
from collections.abc import Callable
from typing import IO, Any

import torch

from .config import TrainConfig

FORMAT_VERSION = 2
"""2: format 1 plus the content digest ``sha256``."""
CHECKPOINT = "checkpoint.pt"
DIGEST_KEY = "sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, of another format, or inconsistent with
    itself or with the data it is resumed on. The message names the file (or what was checked)."""


TMP_PREFIX = ".tmp-acn-"
"""Temporary files of :func:`atomic_write` are named ``.tmp-acn-<pid>-<random>-<name>``."""
_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-[0-9a-f]+-")


def _create_temporary(folder: str, name: str) -> tuple[int, str]:
    """A new file next to the target, created as ``open()`` creates files (mode 0666 minus the
    umask, 0644 under the usual 022; mkstemp's 0600 would set checkpoints apart from images)."""
    while True:
        tmp = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{name}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove the temporary files that killed writes of :func:`atomic_write` left in ``folder``:
    those of our prefix whose writing process (its pid is in the name) no longer runs on this
    machine. Returns the names removed. A write in progress is never touched (its process runs);
    a stray file of a process on another machine sharing the folder is left alone only while a
    process of that pid runs here."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        match = _TMP_NAME.match(name)
        if match and not _running(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))
                removed.append(name)
    return removed


def atomic_write(path: str, content: str | bytes | Callable[[IO[bytes]], None]) -> None:
    """Write ``content`` (text as UTF-8, bytes, or a function that writes into the open binary
    file) to ``path`` so that ``path`` always holds either its previous complete content or the
    new one, also across a crash or power loss.

    The content goes to a temporary file in the same folder (``.tmp-acn-<pid>-...``, created with
    mode 0666 minus the umask, as ``open()`` would create ``path``), which is flushed and fsynced,
    then moved over ``path`` by ``os.replace`` (atomic on POSIX), and the folder is fsynced so
    that the rename itself is durable. On any error the temporary file is removed and ``path`` is
    untouched; a killed process leaves it behind, for :func:`remove_stale_temporaries`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temporary(folder, os.path.basename(path))
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


def _json_value(obj: object) -> object:
    """``obj`` with every non-finite float (a diverged loss, an undefined mean) as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _json_value(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_value(value) for value in obj]
    return obj


def write_json(path: str, obj: object) -> None:
    """``obj`` as strict JSON (``allow_nan=False``: NaN and inf are not JSON, so a non-finite
    number is written as null) through :func:`atomic_write`."""
    atomic_write(path, json.dumps(_json_value(obj), indent=1, allow_nan=False))


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


def _feed(h: Any, obj: object) -> None:
    """Add ``obj`` to the hash ``h`` as a canonical byte stream: a type tag and a length before
    every item, so that no two different contents give the same stream."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, list | tuple):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        for value in obj:
            _feed(h, value)
    elif obj is None or isinstance(obj, bool | int | float | str):
        text = repr(obj).encode()  # repr round-trips floats exactly
        h.update(f"{type(obj).__name__}{len(text)}:".encode() + text)
    else:
        raise TypeError(f"a checkpoint holds tensors, dicts, lists, tuples, numbers, strings and None, "
                        f"not {type(obj).__name__}")


def content_digest(checkpoint: dict[str, Any]) -> str:
    """sha256 (hex) of every entry of ``checkpoint`` but ``sha256`` itself, in order: the dtype,
    shape and bytes of each tensor (on the CPU), the repr of each number and string, and the
    structure of the dicts, lists and tuples around them. It does not depend on where the
    tensors lived or on how torch.save lays out the file."""
    h = hashlib.sha256()
    _feed(h, {key: value for key, value in checkpoint.items() if key != DIGEST_KEY})
    return h.hexdigest()


def save_checkpoint(checkpoint: dict[str, Any], path: str) -> None:
    """``torch.save`` of ``checkpoint`` with its :func:`content_digest` (key ``sha256``) through
    :func:`atomic_write`: a killed run leaves the previous file whole."""
    payload = {**{k: v for k, v in checkpoint.items() if k != DIGEST_KEY}, DIGEST_KEY: content_digest(checkpoint)}
    atomic_write(path, lambda f: torch.save(payload, f))


_SCHEMA: dict[str, Any] = {
    "format_version": int, "config": dict, "model": dict, "optimizer": {"state": dict, "param_groups": list},
    "position": {"pass_index": int, "order": torch.Tensor, "offset": int, "step": int, "sums": torch.Tensor,
                 "elapsed": (int, float)},
    "rng": {"seed": int, "torch": torch.Tensor}, "history": list, "world_size": int,
}


def _type_ok(value: object, want: type | tuple[type, ...]) -> bool:
    """isinstance, except that a bool is not an int here."""
    wants = want if isinstance(want, tuple) else (want,)
    return isinstance(value, wants) and (bool in wants or not isinstance(value, bool))


def check_schema(checkpoint: object, source: str) -> None:
    """Raise :class:`CheckpointError` (naming ``source``, e.g. the file) unless ``checkpoint`` has
    every key of the format with the right type (``position`` and ``rng`` and ``optimizer``
    entry by entry; ``config`` must make a valid :class:`TrainConfig`; ``world_size`` >= 1).
    The values against the data are :func:`acn_kernels.acn.train.check_position`'s to check."""
    def walk(obj: object, schema: dict[str, Any], where: str) -> None:
        if not isinstance(obj, dict):
            raise CheckpointError(f"{source}: {where or 'the checkpoint'} must be a dict, got {type(obj).__name__}")
        for key, want in schema.items():
            name = f"{where}.{key}" if where else key
            if key not in obj:
                raise CheckpointError(f"{source}: not a complete checkpoint: no {name!r}")
            if isinstance(want, dict):
                walk(obj[key], want, name)
            elif not _type_ok(obj[key], want):
                expected = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
                raise CheckpointError(f"{source}: {name} must be {expected}, got {type(obj[key]).__name__}")

    walk(checkpoint, _SCHEMA, "")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(checkpoint["config"]) - fields)
    if unknown:
        raise CheckpointError(f"{source}: config has unknown fields {unknown}")
    try:
        TrainConfig(**checkpoint["config"]).validate()
    except ValueError as e:
        raise CheckpointError(f"{source}: config: {e}") from None
    if not all(isinstance(key, str) for key in checkpoint["model"]):
        raise CheckpointError(f"{source}: model must map parameter names to tensors")
    if checkpoint["world_size"] < 1:
        raise CheckpointError(f"{source}: world_size must be >= 1, got {checkpoint['world_size']}")


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict in file ``path`` (``torch.load(weights_only=True)``), checked: its
    format version (:data:`FORMAT_VERSION`; format 1 loads with a warning), its content digest
    (then removed from the dict) and its schema (:func:`check_schema`). Anything it cannot use
    raises :class:`CheckpointError` naming the file (a missing file: FileNotFoundError)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a damaged file makes torch.load's unpickler raise almost anything
        first = (str(e).splitlines() or [""])[0]
        why = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({why})") from e
    version = ckpt.get("format_version") if isinstance(ckpt, dict) else None
    if version == 1:
        warnings.warn(f"{path}: checkpoint format 1 has no content digest, so its integrity is not checked "
                      "(a run resumed from it saves format 2)", UserWarning, stacklevel=2)
    elif version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version!r}, this library reads {FORMAT_VERSION} (and 1)")
    else:
        stored = ckpt.pop(DIGEST_KEY, None)
        if not isinstance(stored, str):
            raise CheckpointError(f"{path}: not a complete checkpoint: no content digest {DIGEST_KEY!r}")
        try:
            actual = content_digest(ckpt)
        except TypeError as e:
            raise CheckpointError(f"{path}: {e}") from None
        if actual != stored:
            raise CheckpointError(f"{path}: the content does not match its digest (sha256 {actual[:16]}..., "
                                  f"stored {stored[:16]}...): the file changed after it was written")
    check_schema(ckpt, path)
    return ckpt


def load_state(module: torch.nn.Module | torch.optim.Optimizer, state: dict[str, Any], what: str) -> None:
    """``module.load_state_dict(state)``; a state that does not fit (missing or unexpected keys,
    other shapes) raises :class:`CheckpointError` naming ``what``."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{what} does not fit the model its config builds: {e}") from e


__all__ = ["CHECKPOINT", "FORMAT_VERSION", "TMP_PREFIX", "CheckpointError", "atomic_write", "build_checkpoint",
           "check_schema", "content_digest", "load_checkpoint", "load_state", "remove_stale_temporaries",
           "save_checkpoint", "write_json"]
